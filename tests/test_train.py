"""Training of the built-in model: pixel labels, auxiliary probes, loss, resumable runs."""

import json
import os

import pytest
import torch

from csp_inductor.evaluation import haystack as hs
from csp_inductor.evaluation import train

COLOURS, SHAPES = list(hs.COLOURS), list(hs.SHAPES)


def _names(sample: hs.Sample) -> list[str]:
    words = sample.prompt.split()
    starts = [i for i, w in enumerate(words[:-3]) if w == "image" and words[i + 3] == "<image>"]
    return [" ".join(words[i + 1 : i + 3]) for i in starts]


@pytest.mark.parametrize("task", hs.TASKS)
def test_cell_labels_match_read_board_and_frame_codes(task):
    s = hs.make_sample(task, 3, num_images=6, fill=0.7)
    labels = train.cell_labels(s.pixel_values)
    assert labels.shape == (6, hs.TOKENS_PER_IMAGE, 4) and labels.dtype == torch.long
    for k, (pixels, name) in enumerate(zip(s.pixel_values, _names(s), strict=True)):
        for c, cell in enumerate(hs.read_board(pixels)):
            colour, shape = cell or (None, None)
            want = (0, 0) if cell is None else (COLOURS.index(colour) + 1, SHAPES.index(shape) + 1)
            assert tuple(labels[k, c, :2].tolist()) == want, (k, c, cell)
            assert tuple(labels[k, c, 2:].tolist()) == hs.frame_code(name)


def _tiny_batch(tasks=hs.TASKS, num_images=3):
    samples = [
        hs.make_sample(t, i, num_images=num_images + i, num_questions=3)
        for i, t in enumerate(tasks)
    ]
    return samples, hs.collate(samples, with_answers=True)


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    config = train.build_config(hidden=32, layers=3)
    model = LlavaForConditionalGeneration(config)
    probes = train.AuxiliaryProbes(32, len(hs.VOCAB))
    return model, probes


def test_auxiliary_loss_trains_every_probe_and_reaches_the_vision_tower(tiny):
    model, probes = tiny
    samples, batch = _tiny_batch()
    loss, aux, acc = train.training_loss(model, probes, batch, samples)
    assert loss.ndim == aux.ndim == 0 and torch.isfinite(loss) and torch.isfinite(aux)
    assert 0.0 <= float(acc) <= 1.0
    aux.backward()  # the auxiliary loss alone
    for name, p in probes.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    reached = {n for n, p in model.named_parameters() if p.grad is not None}
    assert "model.vision_tower.embeddings.patch_embedding.weight" in reached
    assert any(n.startswith("model.multi_modal_projector.") for n in reached)
    assert any(n.startswith("model.language_model.layers.0.") for n in reached)
    # the retrieval loss shapes layer 2's queries and keys, the retrieved-cell probe what its
    # attention fetches (values and output projection)
    layer2 = {n.removeprefix("model.language_model.layers.2.") for n in reached if ".2." in n}
    for part in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert f"self_attn.{part}.weight" in layer2, part
    model.zero_grad(set_to_none=True)
    probes.zero_grad(set_to_none=True)


def test_previous_cell_targets_never_cross_samples(tiny, monkeypatch):
    """The first image of each prompt has no predecessor: its previous-cell loss is masked."""
    model, probes = tiny
    samples, batch = _tiny_batch(tasks=("comparison", "comparison"), num_images=2)
    seen = []
    real = torch.nn.functional.cross_entropy

    def spy(input, target, *args, **kwargs):
        if kwargs.get("ignore_index") == -100:
            seen.append(target.clone())
        return real(input, target, *args, **kwargs)

    monkeypatch.setattr(train.F, "cross_entropy", spy)
    with torch.no_grad():
        train.training_loss(model, probes, batch, samples)
    assert len(seen) == 2  # previous colour, previous shape
    per_image = seen[0].view(-1, hs.TOKENS_PER_IMAGE)
    firsts = [0, samples[0].num_images]
    for k in range(len(per_image)):
        assert (per_image[k] == -100).all() == (k in firsts), k
    labels = train.cell_labels(batch["pixel_values"])
    assert torch.equal(per_image[1], labels[0, :, 0])  # image 1 predicts image 0's colours


def test_answer_loss_weighs_every_prompt_the_same(tiny):
    model, _ = tiny
    samples, batch = _tiny_batch()
    with torch.no_grad():
        loss, aux, _ = train.training_loss(model, None, batch, samples)
        logits = model(
            **{k: batch[k] for k in ("input_ids", "pixel_values", "attention_mask")},
            position_ids=hs.position_ids(batch["attention_mask"]),
        ).logits
    target = batch["labels"][:, 1:]
    per_prompt = [
        torch.nn.functional.cross_entropy(row_logits[row != -100], row[row != -100])
        for row_logits, row in zip(logits[:, :-1], target, strict=True)
    ]
    assert len({int((row != -100).sum()) for row in target}) > 1  # the weighting matters
    torch.testing.assert_close(loss, torch.stack(per_prompt).mean())
    assert float(aux) == 0.0


@pytest.mark.slow
def test_training_run_resumes_exports_and_fine_tunes(tmp_path, capsys):
    """Two steps, then two more from the checkpoint, then an offline-loadable export; a run
    ``--init`` from that export starts from its weights."""
    shape = ["--hidden", "32", "--layers", "3", "--batch-tokens", "512", "--eval-n", "4"]
    common = [*shape, "--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "out")]
    train.main([*common, "--save-every", "1", "--steps", "2"])
    state = torch.load(tmp_path / "work" / "state.pt", weights_only=False)
    assert state["step"] == 2 and state["probes"] is not None
    train.main([*common, "--save-every", "1", "--steps", "4"])
    state = torch.load(tmp_path / "work" / "state.pt", weights_only=False)
    assert state["step"] == 4
    report = json.loads((tmp_path / "work" / "eval.json").read_text())
    assert report["step"] == 4 and set(report["accuracy"]) == {*hs.TASKS, "all"}
    model = hs.load_builtin_model(tmp_path / "out")
    assert not any("probe" in n for n, _ in model.named_parameters())

    tuned = ["--work-dir", str(tmp_path / "ft"), "--out", str(tmp_path / "tuned")]
    train.main([*shape, *tuned, "--init", str(tmp_path / "out"), "--steps", "0"])
    start = hs.load_builtin_model(tmp_path / "tuned").state_dict()
    for name, weight in model.state_dict().items():
        torch.testing.assert_close(start[name], weight, msg=name)
    # a fine-tune resumes from its own checkpoint (the same --init, however spelled) ...
    tuned = ["--work-dir", str(tmp_path / "ft1"), "--out", str(tmp_path / "tuned")]
    train.main([*shape, *tuned, "--init", str(tmp_path / "out"), "--steps", "1"])
    relative = os.path.relpath(tmp_path / "out")
    train.main([*shape, *tuned, "--init", relative, "--steps", "2"])
    state = torch.load(tmp_path / "ft1" / "state.pt", weights_only=False)
    assert state["step"] == 2
    # ... but a from-scratch checkpoint is not resumed as a fine-tune
    with pytest.raises(SystemExit):
        train.main([*common, "--init", str(tmp_path / "out"), "--steps", "0"])
    assert "holds a run with --init None" in capsys.readouterr().err


def test_retrieval_loss_supervises_the_models_own_attention_head(tiny):
    """The loss's distribution is the model's layer-RETRIEVAL_LAYER head-0 attention at each
    "?", and its target is the question's focus (left padding included)."""
    model, _ = tiny
    samples, batch = _tiny_batch()
    model.set_attn_implementation("eager")
    mask = batch["attention_mask"]
    with torch.no_grad():
        out = model(
            input_ids=batch["input_ids"], pixel_values=batch["pixel_values"], attention_mask=mask,
            position_ids=hs.position_ids(mask),
            output_hidden_states=True, output_attentions=True,
        )  # fmt: skip
        queries = train.retrieval_queries(batch, samples)
        loss = train.retrieval_loss(model, out.hidden_states, batch, queries)
    rows, cols, target = queries
    probs = out.attentions[train.RETRIEVAL_LAYER][rows, 0, cols]  # (queries, keys)
    ids = batch["input_ids"][rows, cols]
    is_question = ids == hs.TOKEN_TO_ID["?"]
    questions = int(is_question.sum())
    unpadded = target - (mask == 0).sum(1)[rows]
    assert torch.equal(unpadded[is_question], torch.cat([s.focus for s in samples]))
    assert questions == sum(len(s.focus) for s in samples)
    # the other queries are first answer tokens of two-token answers (name, colour + shape)
    assert len(rows) - questions == sum(
        len(a) == 2 for s in samples for a in (s.answer_ids, *(a for _, a in s.followups))
    )
    assert len(rows) > questions
    want = -probs[torch.arange(len(rows)), target].log().mean()
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=1e-5)
    # every target is a prompt position of its own row, before its "?"
    assert (target < cols).all() and mask[rows, target].all()


def test_too_few_layers_for_the_auxiliary_losses_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        train.main(["--layers", "2", "--steps", "1"])
    assert "--layers must be >= 3" in capsys.readouterr().err


def test_retrieved_cell_probe_targets_the_focus_cells_contents(tiny, monkeypatch):
    """After the retrieval layer, every query whose focus is an image cell predicts that cell's
    colour, shape and frame code; text foci (the passkey) are left out."""
    model, probes = tiny
    samples, batch = _tiny_batch()
    seen = []
    real = torch.nn.functional.cross_entropy

    def spy(input, target, *args, **kwargs):
        seen.append(target.clone())
        return real(input, target, *args, **kwargs)

    monkeypatch.setattr(train.F, "cross_entropy", spy)
    with torch.no_grad():
        train.training_loss(model, probes, batch, samples)
    rows, _, target = train.retrieval_queries(batch, samples)
    on_image = batch["input_ids"][rows, target] == hs.IMAGE_TOKEN_ID
    assert 0 < int(on_image.sum()) < len(rows)  # the text_needle query is left out
    labels = train.cell_labels(batch["pixel_values"])  # (images, cells, 4) in batch order
    want = []
    for row, pos in zip(rows[on_image].tolist(), target[on_image].tolist(), strict=True):
        sample = samples[row]
        first_image = sum(s.num_images for s in samples[:row])
        start = int((batch["attention_mask"][row] == 0).sum())
        index = int(sample.is_image[: pos - start].sum())  # image tokens before the focus
        image, cell = divmod(index, hs.TOKENS_PER_IMAGE)
        want.append(labels[first_image + image, cell])
    want = torch.stack(want)
    retrieved = seen[-5:-1]  # the four retrieved-cell heads, then the retrieval loss
    for i, got in enumerate(retrieved):
        assert torch.equal(got, want[:, i]), i


def test_init_with_another_shape_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        train.main(["--init", str(hs.BUILTIN_MODEL_PATH), "--hidden", "64", "--steps", "1"])
    err = capsys.readouterr().err
    assert "--init" in err and "hidden size 128" in err and "--hidden 64" in err


def test_auxiliary_loss_is_finite_without_any_image_focus(tiny):
    model, probes = tiny
    samples, batch = _tiny_batch(tasks=("text_needle",))
    with torch.no_grad():
        _, aux, _ = train.training_loss(model, probes, batch, samples)
    assert torch.isfinite(aux)
