"""VisualHaystack generator: determinism, token layout, answerability, batching, scoring."""

import pytest
import torch

from csp_inductor.evaluation import haystack as hs


@pytest.mark.parametrize("task", hs.TASKS)
def test_make_sample_is_deterministic(task):
    a = hs.make_sample(task, 123, num_images=7)
    b = hs.make_sample(task, 123, num_images=7)
    c = hs.make_sample(task, 124, num_images=7)
    assert torch.equal(a.input_ids, b.input_ids)
    assert torch.equal(a.pixel_values, b.pixel_values)
    assert torch.equal(a.evidence, b.evidence)
    assert a.answer == b.answer
    assert not (
        torch.equal(a.input_ids, c.input_ids) and torch.equal(a.pixel_values, c.pixel_values)
    )


def test_make_split_is_deterministic_and_splits_are_disjoint():
    train = hs.make_split("train", 40, seed=0)
    again = hs.make_split("train", 40, seed=0)
    test = hs.make_split("test", 40, seed=0)
    assert [s.prompt for s in train] == [s.prompt for s in again]
    assert not {s.prompt for s in train} & {s.prompt for s in test}
    assert [s.task for s in test[:8]] == list(hs.TASKS) * 2
    low, high = hs.DEFAULT_NUM_IMAGES["test"]
    assert all(low <= s.num_images <= high for s in test)


@pytest.mark.parametrize("task", hs.TASKS)
@pytest.mark.parametrize("num_images", [2, 9, 40])
def test_token_layout(task, num_images):
    s = hs.make_sample(task, 5, num_images=num_images)
    ids = s.input_ids
    assert ids.dtype == torch.long and ids.ndim == 1
    assert ids[0] == hs.BOS_TOKEN_ID and hs.VOCAB[ids[-1]] == "?"
    assert s.pixel_values.shape == (num_images, 3, hs.IMAGE_SIZE, hs.IMAGE_SIZE)
    assert s.pixel_values.dtype == torch.float32
    assert s.pixel_values.min() >= -1 and s.pixel_values.max() <= 1
    assert int(s.is_image.sum()) == num_images * hs.TOKENS_PER_IMAGE
    # every image: "image <name>" then exactly TOKENS_PER_IMAGE placeholders
    starts = (s.is_image[1:] & ~s.is_image[:-1]).nonzero().flatten() + 1
    assert len(starts) == num_images
    for p in starts.tolist():
        assert hs.VOCAB[ids[p - 3]] == "image"
        assert " ".join(hs.VOCAB[i] for i in ids[p - 2 : p]) in hs.NAMES
        assert s.is_image[p : p + hs.TOKENS_PER_IMAGE].all()
    assert s.answer_ids.tolist() == [hs.TOKEN_TO_ID[w] for w in s.answer.split()]
    assert 1 <= len(s.answer_ids) <= 2
    # prompts are mostly image tokens once there are a few images
    if num_images >= 9:
        assert s.is_image.float().mean() > 0.7


def test_prompt_lengths_cover_several_hundred_tokens():
    lengths = [len(s.input_ids) for s in hs.make_split("test", 40, seed=1)]
    assert min(lengths) >= 140 and max(lengths) >= 600


@pytest.mark.parametrize("task", hs.TASKS)
def test_each_task_is_answerable_from_its_content(task):
    for seed in range(25):
        s = hs.make_sample(task, seed, num_images=2 + seed % 30)
        assert hs.solve(s) == s.answer, (seed, s.prompt)


@pytest.mark.parametrize("task", hs.TASKS)
def test_evidence_points_far_back(task):
    s = hs.make_sample(task, 11, num_images=20)
    ev = s.evidence
    assert ev.max() < len(s.input_ids)
    question_start = len(s.input_ids) - 10
    far = ev[ev < question_start]
    assert len(far) >= 1
    if task != "text_needle":
        assert s.is_image[far].any()  # the answer is in the pixels
    else:
        assert hs.VOCAB[s.input_ids[far[-1]]] == s.answer


def test_render_read_board_roundtrip():
    board = [(c, sh) for c in hs.COLOURS for sh in hs.SHAPES][: hs.TOKENS_PER_IMAGE]
    board[3] = None
    pixels = (torch.from_numpy(hs.render(board)) - hs.PIXEL_MEAN) / hs.PIXEL_STD
    assert hs.read_board(pixels) == board


def test_collate_left_pads():
    samples = [hs.make_sample(t, i, num_images=2 + 3 * i) for i, t in enumerate(hs.TASKS)]
    batch = hs.collate(samples)
    lengths = [len(s.input_ids) for s in samples]
    assert batch["input_ids"].shape == (4, max(lengths))
    assert batch["attention_mask"].sum(-1).tolist() == lengths
    for row, s in zip(range(4), samples, strict=True):
        pad = max(lengths) - len(s.input_ids)
        assert (batch["input_ids"][row, :pad] == hs.PAD_TOKEN_ID).all()
        assert (batch["attention_mask"][row, :pad] == 0).all()
        assert torch.equal(batch["input_ids"][row, pad:], s.input_ids)
    assert torch.equal(batch["pixel_values"], torch.cat([s.pixel_values for s in samples]))
    n_img = int((batch["input_ids"] == hs.IMAGE_TOKEN_ID).sum())
    assert n_img == batch["pixel_values"].shape[0] * hs.TOKENS_PER_IMAGE


def test_collate_with_answers_labels_the_tail():
    samples = [
        hs.make_sample("comparison", 1, num_images=3),
        hs.make_sample("text_needle", 1, num_images=5),
    ]
    batch = hs.collate(samples, with_answers=True)
    for row, s in enumerate(samples):
        labelled = batch["labels"][row][batch["labels"][row] != -100]
        assert labelled.tolist() == [*s.answer_ids.tolist(), hs.EOS_TOKEN_ID]
        assert batch["input_ids"][row, -len(labelled) :].tolist() == labelled.tolist()
    with pytest.raises(ValueError, match="empty"):
        hs.collate([])


def test_score_accepts_text_and_ids():
    s = hs.make_sample("comparison", 3, num_images=4)
    ids = s.answer_ids.tolist()
    assert hs.score([*ids, hs.EOS_TOKEN_ID, 17], s)
    assert hs.score(torch.tensor([*ids, hs.PAD_TOKEN_ID]), s)
    assert hs.score(f"  {s.answer} <eos> junk", s)
    assert not hs.score(ids[:1], s)
    assert not hs.score("", s)


def test_tokenizer_matches_vocab():
    tok = hs.build_tokenizer()
    s = hs.make_sample("cross_modal", 2, num_images=3)
    assert tok(s.prompt, add_special_tokens=False)["input_ids"] == s.input_ids.tolist()
    assert tok.convert_tokens_to_ids("<image>") == hs.IMAGE_TOKEN_ID
    assert tok.pad_token_id == hs.PAD_TOKEN_ID and tok.eos_token_id == hs.EOS_TOKEN_ID


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"task": "nope", "num_images": 4}, "task"),
        ({"task": "text_needle", "num_images": 1}, "num_images"),
        ({"task": "text_needle", "num_images": 65}, "num_images"),
        ({"task": "text_needle", "num_images": 4, "num_facts": 0}, "num_facts"),
        ({"task": "comparison", "num_images": 4, "fill": 1.0}, "fill"),
    ],
)
def test_bad_arguments_raise(kwargs, field):
    task = kwargs.pop("task")
    with pytest.raises(ValueError, match=field):
        hs.make_sample(task, 0, **kwargs)


def test_bad_split_raises():
    with pytest.raises(ValueError, match="split"):
        hs.make_split("valid", 3)


def test_batch_runs_through_a_llava_model():
    from transformers import LlavaForConditionalGeneration

    from csp_inductor.evaluation.train import build_config

    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(build_config(hidden=32, layers=1)).eval()
    batch = hs.collate([hs.make_sample(t, 0, num_images=3) for t in hs.TASKS])
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape == (*batch["input_ids"].shape, len(hs.VOCAB))
    assert model.config.image_token_id == hs.IMAGE_TOKEN_ID


@pytest.mark.parametrize("task", hs.TASKS)
def test_followup_questions_are_answerable_and_labelled(task):
    s = hs.make_sample(task, 4, num_images=9, num_facts=6, num_questions=4)
    if task == "text_needle":
        assert not s.followups  # one passkey per prompt
        return
    assert 1 <= len(s.followups) <= 3  # as many as the context allows
    assert hs.solve(s) == s.answer
    # the context ends at the last image token or fact full stop; questions hold neither
    ends = [i for i, t in enumerate(s.input_ids.tolist()) if hs.VOCAB[t] in (".", "<image>")]
    context = s.input_ids[: ends[-1] + 1]
    for q, a in s.followups:
        alt = hs.Sample(
            task=task,
            input_ids=torch.cat([context, q]),
            pixel_values=s.pixel_values,
            answer=hs.decode(a),
            answer_ids=a,
            evidence=s.evidence,
        )
        assert hs.solve(alt) == alt.answer
    batch = hs.collate([s], with_answers=True)
    labelled = batch["labels"][0][batch["labels"][0] != -100].tolist()
    expected = [*s.answer_ids.tolist(), hs.EOS_TOKEN_ID]
    for _, a in s.followups:
        expected += [*a.tolist(), hs.EOS_TOKEN_ID]
    assert labelled == expected


@pytest.mark.parametrize("task", hs.TASKS)
def test_focus_is_where_each_answer_is_read_from(task):
    """Every question's ``focus`` holds its answer: the passkey's value token, or an image cell
    whose pixels show the asked object / the colour asked for / the new object."""
    s = hs.make_sample(task, 21, num_images=12, num_questions=4)
    answers = [s.answer] + [hs.decode(a) for _, a in s.followups]
    assert len(s.focus) == len(answers) == 1 + len(s.followups)
    boards = [hs.read_board(p) for p in s.pixel_values]
    image_rank = s.is_image.long().cumsum(0) - 1  # index among image tokens
    words = s.prompt.split()
    names = [" ".join(words[i - 2 : i]) for i in range(2, len(words)) if words[i] == "<image>"]
    names = names[:: hs.TOKENS_PER_IMAGE]
    for pos, answer in zip(s.focus.tolist(), answers, strict=True):
        if task == "text_needle":
            assert hs.VOCAB[s.input_ids[pos]] == answer
            continue
        assert s.is_image[pos]
        image, cell = divmod(int(image_rank[pos]), hs.TOKENS_PER_IMAGE)
        content = boards[image][cell]
        if task == "image_needle":  # the image holding the object is the one answered
            assert names[image] == answer and content is not None
            if pos == s.focus[0]:
                assert tuple(s.prompt.split()[-3:-1]) == content
        elif task == "cross_modal":
            assert content is not None and content[0] == answer
        else:  # comparison: the second image's cell, different from the first image's
            assert " ".join(content) == answer and boards[image - 1][cell] != content
