"""Train the built-in tiny LLaVA on VisualHaystack, from scratch, on CPU.

    python -m csp_inductor.evaluation.train --out csp_inductor/assets/tiny_llava

Seeded and resumable: the batch of step ``s`` is a pure function of ``(--seed, s)`` and the
curriculum frontier, and the model/optimizer/curriculum state is checkpointed to
``--work-dir`` (outside the package) every ``--save-every`` steps; rerunning the same command
continues from there (``--export-only`` writes the latest checkpoint to ``--out`` and
evaluates it, e.g. while a run is still going). ``--init PATH`` fine-tunes a saved model
instead of starting from random weights (fresh probes and optimizer; with ``--hold 0 --ramp 0``
batches span 2..``--max-images`` images from the first step, biased towards the longest).

Auxiliary losses (training only; the probes are discarded at export) give the decoder direct
targets that a short CPU run does not discover from the answers alone:

* probes, linear read-outs of hidden states: after layer 1 every image token predicts its own
  cell (colour, shape, the two frame-code colours) and every ``?`` the question's last
  ``QUESTION_SPAN`` tokens; after layer 2 every image token predicts the same cell of the
  previous image (what ``comparison`` needs); after the retrieval layer every retrieval query
  (below) whose focus is an image cell predicts that cell's contents, so what the head fetches
  carries the whole cell (the second word of an image's name included);
* supervised retrieval: head 0 of layer ``RETRIEVAL_LAYER`` is trained to attend from each
  ``?`` (and from the first token of a two-token answer) to the question's ``focus``, the
  prompt position the answer is read from.

Their weight is ``--aux-weight``; 0 trains on the answers alone. Measured: answers alone (6000
steps) left the three image tasks at chance on the held-out split; probes alone left them near
chance on 2-image prompts after 2800 steps; with supervised retrieval, two of them passed 60%
on 2-image prompts within 900 steps.

Curriculum: prompts hold 2 images for the first ``--hold`` fraction of the steps, then the
largest image count grows to ``--max-images`` by the ``--ramp`` fraction; it grows earlier
whenever the running answer accuracy reaches ``--advance-at``. Each batch has one image count
(biased towards the frontier) and a constant prompt-token budget; every training prompt carries
up to ``--questions`` questions (the first in the test format, the rest as follow-ups), which
multiplies the supervision per forward pass.

At the end the model (safetensors), tokenizer, processor and generation config are written to
``--out`` and per-task greedy full-cache accuracy on the held-out split is printed and saved as
``eval.json`` in the work dir.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm
from transformers.models.llama.modeling_llama import rotate_half

from csp_inductor.evaluation import haystack as hs

DEFAULT_WORK_DIR = Path("/tmp/csp_inductor_tiny_llava")


def build_config(*, hidden: int = 128, layers: int = 4):
    """The built-in model's ``LlavaConfig``: a 1-layer SigLIP-style tower (one patch per cell,
    ``TOKENS_PER_IMAGE`` features per image, no CLS) and a Llama decoder with GQA (4 query heads,
    2 KV heads)."""
    from transformers import LlamaConfig, LlavaConfig, SiglipVisionConfig

    vision = SiglipVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_channels=hs.NUM_CHANNELS,
        image_size=hs.IMAGE_SIZE,
        patch_size=hs.CELL,
        vision_use_head=False,
    )
    text = LlamaConfig(
        vocab_size=len(hs.VOCAB),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        pad_token_id=hs.PAD_TOKEN_ID,
        bos_token_id=hs.BOS_TOKEN_ID,
        eos_token_id=hs.EOS_TOKEN_ID,
        tie_word_embeddings=True,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=hs.IMAGE_TOKEN_ID,
        image_seq_length=hs.TOKENS_PER_IMAGE,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
    )


def curriculum_floor(step: int, steps: int, hold: float, ramp: float, max_images: int) -> int:
    """Smallest frontier allowed at ``step``: 2 for the first ``hold`` fraction of training,
    then growing linearly to ``max_images`` at the ``ramp`` fraction (so long prompts are always
    reached, whatever the training accuracy)."""
    frac = (step - hold * steps) / max(1.0, (ramp - hold) * steps)
    return round(2 + (max_images - 2) * min(1.0, max(0.0, frac)))


def batch_for_step(step: int, frontier: int, args) -> list[hs.Sample]:
    """The (deterministic) training batch of ``step`` given the curriculum ``frontier`` (the
    largest image count allowed): one image count per batch, biased towards the frontier, as
    many samples as fit the token budget, tasks cycling."""
    rng = random.Random(f"{args.seed}/{step}")
    k = max(2, frontier - int(rng.random() ** 2 * (frontier - 1)))
    approx_len = k * (hs.TOKENS_PER_IMAGE + 2) + 20 + 10 * args.questions
    n = max(1, min(64, args.batch_tokens // approx_len))
    offset = rng.randrange(len(hs.TASKS))
    seeds = [rng.getrandbits(62) for _ in range(n)]
    return [
        hs.make_sample(
            hs.TASKS[(offset + i) % len(hs.TASKS)],
            s,
            num_images=k,
            num_facts=rng.randint(1, 8),
            num_questions=args.questions,
        )
        for i, s in enumerate(seeds)
    ]


CELL_LAYER = 1  # decoder layer whose output predicts each image token's own cell
PREVIOUS_LAYER = 2  # ... and the same cell of the previous image
QUESTION_LAYER = 1  # ... and, at every "?", the question's last QUESTION_SPAN tokens
QUESTION_SPAN = 7
RETRIEVAL_LAYER = 2  # one head of this layer is taught to attend from "?" to the needle
RETRIEVED_LAYER = RETRIEVAL_LAYER + 1  # its output predicts the contents of the needle cell
_SHAPE_MASKS = torch.stack([torch.from_numpy(hs._MASKS[s]) for s in hs.SHAPES])
_COLOUR_RGB = torch.tensor(list(hs.COLOURS.values()))
_FRAME_RGB = torch.tensor(hs.FRAME_LEVELS)


def cell_labels(pixel_values: torch.Tensor) -> torch.Tensor:
    """Class labels of every cell, read from pixels (a vectorized ``hs.read_board``).

    ``pixel_values`` (num_images, 3, IMAGE_SIZE, IMAGE_SIZE) normalized; returns a long tensor
    (num_images, TOKENS_PER_IMAGE, 4): colour (0 empty, 1 + index in ``COLOURS``), shape
    (0 empty, 1 + index in ``SHAPES``) and the two frame-code colours (indices into
    ``FRAME_LEVELS``).
    """
    n, g, c = pixel_values.shape[0], hs.GRID, hs.CELL
    img = pixel_values.float() * hs.PIXEL_STD + hs.PIXEL_MEAN
    cells = img.reshape(n, 3, g, c, g, c).permute(0, 2, 4, 1, 3, 5).reshape(n, g * g, 3, c, c)
    lit = cells.amax(dim=2) > 0.7  # shapes are drawn at 1.0, frames at 0.4
    match = (lit[:, :, None] == _SHAPE_MASKS).flatten(-2).all(-1)  # (n, cells, shapes)
    shape = torch.where(match.any(-1), match.int().argmax(-1) + 1, 0)
    rgb = (cells * lit[:, :, None]).sum((-1, -2)) / lit.sum((-1, -2)).clamp(min=1)[..., None]
    colour = (rgb[:, :, None] - _COLOUR_RGB).abs().sum(-1).argmin(-1) + 1
    colour = torch.where(shape > 0, colour, 0)
    mid = c // 2  # the frame's first colour runs along the top edge, its second along the bottom
    frames = [
        (cells[:, :, :, row, mid, None] - _FRAME_RGB.T).abs().sum(2).argmin(-1)
        for row in (0, c - 1)
    ]
    return torch.stack([colour, shape, *frames], dim=-1)


class AuxiliaryProbes(nn.Module):
    """Linear read-outs of decoder hidden states, trained with the model and then discarded.

    ``loss`` takes the decoder's ``hidden_states`` (tuple of (batch, seq, hidden), index 0 the
    embeddings), the batch's ``input_ids`` (batch, seq), ``pixel_values``, the number of
    images of each sample (to find each image's predecessor within its own prompt) and the
    retrieval ``queries`` ``(rows, cols, targets)`` of :func:`retrieval_queries`.
    """

    def __init__(self, hidden: int, vocab: int):
        super().__init__()
        classes = (
            len(hs.COLOURS) + 1,
            len(hs.SHAPES) + 1,
            len(hs.FRAME_LEVELS),
            len(hs.FRAME_LEVELS),
        )
        self.cell = nn.ModuleList(nn.Linear(hidden, k) for k in classes)
        self.previous = nn.ModuleList(nn.Linear(hidden, k) for k in classes[:2])
        self.retrieved = nn.ModuleList(nn.Linear(hidden, k) for k in classes)
        self.question = nn.ModuleList(nn.Linear(hidden, vocab) for _ in range(QUESTION_SPAN))

    def loss(
        self, hidden_states, input_ids, pixel_values, images_per_sample, queries
    ) -> torch.Tensor:
        labels = cell_labels(pixel_values)  # (images, cells, 4), images in batch order
        first = torch.zeros(len(labels), dtype=torch.bool)
        first[torch.tensor(images_per_sample).cumsum(0)[:-1]] = True
        first[0] = True
        previous = torch.roll(labels[:, :, :2], 1, dims=0).masked_fill(first[:, None, None], -100)
        labels, previous = labels.flatten(0, 1), previous.flatten(0, 1)
        is_image = input_ids == hs.IMAGE_TOKEN_ID  # row-major order == batch order of images
        h_cell = hidden_states[CELL_LAYER][is_image]
        h_prev = hidden_states[PREVIOUS_LAYER][is_image]
        total = sum(F.cross_entropy(head(h_cell), labels[:, i]) for i, head in enumerate(self.cell))
        total = total + sum(
            F.cross_entropy(head(h_prev), previous[:, i], ignore_index=-100)
            for i, head in enumerate(self.previous)
        )
        rows, cols = (input_ids == hs.TOKEN_TO_ID["?"]).nonzero(as_tuple=True)
        h_q = hidden_states[QUESTION_LAYER][rows, cols]
        for offset, head in enumerate(self.question, start=1):
            target = input_ids[rows, (cols - offset).clamp(min=0)]
            total = total + 0.5 * F.cross_entropy(head(h_q), target)
        rows, cols, targets = queries
        on_image = is_image[rows, targets]
        if not on_image.any():  # e.g. a batch of one text_needle prompt
            return total
        rows, cols, targets = rows[on_image], cols[on_image], targets[on_image]
        cell = is_image.flatten().cumsum(0)[rows * is_image.shape[1] + targets] - 1
        h_r = hidden_states[RETRIEVED_LAYER][rows, cols]
        return total + sum(
            F.cross_entropy(head(h_r), labels[cell, i]) for i, head in enumerate(self.retrieved)
        )


def retrieval_queries(batch, samples: list[hs.Sample]):
    """Where retrieval is supervised: every ``?`` (it predicts the first answer token) and, for
    two-token answers, the first answer token too (it predicts the second, which needs the
    needle again). Returns ``(rows, cols, targets)``: the query positions and their questions'
    ``focus``, all in the batch's (left-padded) positions."""
    input_ids, mask = batch["input_ids"], batch["attention_mask"]
    rows, cols = (input_ids == hs.TOKEN_TO_ID["?"]).nonzero(as_tuple=True)
    focus = torch.cat([s.focus for s in samples]) + (mask == 0).sum(1)[rows]
    answers = [len(a) for s in samples for a in (s.answer_ids, *(a for _, a in s.followups))]
    longer = torch.tensor(answers) > 1
    return (
        torch.cat([rows, rows[longer]]),
        torch.cat([cols, cols[longer] + 1]),
        torch.cat([focus, focus[longer]]),
    )


def retrieval_loss(model, hidden_states, batch, queries) -> torch.Tensor:
    """Cross-entropy of one attention head's distribution at every query of
    :func:`retrieval_queries` against its question's ``focus`` position (the needle the answer
    is read from).

    The head is query head 0 (KV head 0) of decoder layer ``RETRIEVAL_LAYER``, recomputed from
    that layer's input exactly as the model computes it (norm, projections, RoPE at the batch's
    positions, causal and padding masks), so the supervision shapes the model's own retrieval.
    """
    text = model.model.language_model
    attn = text.layers[RETRIEVAL_LAYER].self_attn
    h = text.layers[RETRIEVAL_LAYER].input_layernorm(hidden_states[RETRIEVAL_LAYER])
    mask = batch["attention_mask"]
    cos, sin = text.rotary_emb(h, hs.position_ids(mask))
    rows, cols, target = queries
    d = attn.head_dim
    q, k = attn.q_proj(h[rows, cols])[:, :d], attn.k_proj(h)[..., :d]
    q = q * cos[rows, cols] + rotate_half(q) * sin[rows, cols]
    k = k * cos + rotate_half(k) * sin
    logits = torch.einsum("nd,nld->nl", q, k[rows]) * attn.scaling
    positions = torch.arange(h.shape[1])
    allowed = (positions <= cols[:, None]) & mask[rows].bool()
    return F.cross_entropy(logits.masked_fill(~allowed, -math.inf), target)


def training_loss(model, probes: AuxiliaryProbes | None, batch, samples: list[hs.Sample]):
    """``(answer loss, auxiliary loss, answer-token accuracy)`` of one batch.

    The answer loss is the cross-entropy on answer + ``<eos>`` tokens, averaged per prompt and
    then over prompts (the accuracy too); the auxiliary loss is zero without ``probes``.
    """
    mask = batch["attention_mask"]
    out = model(
        input_ids=batch["input_ids"],
        pixel_values=batch["pixel_values"],
        attention_mask=mask,
        position_ids=hs.position_ids(mask),
        output_hidden_states=probes is not None,
    )
    labels = batch["labels"]
    logits, target = out.logits[:, :-1].float(), labels[:, 1:]
    labelled = target != -100
    # every prompt weighs the same, however many questions it carries: otherwise the tasks
    # with many follow-ups (image_needle) drown the single-question ones (text_needle)
    per_row = labelled.sum(1, keepdim=True).clamp(min=1)
    weight = (labelled / per_row)[labelled] / labels.shape[0]
    loss = (F.cross_entropy(logits[labelled], target[labelled], reduction="none") * weight).sum()
    answer = labelled & (target != hs.EOS_TOKEN_ID)
    right = ((logits.argmax(-1) == target) & answer).sum(1) / answer.sum(1).clamp(min=1)
    aux = torch.zeros(())
    if probes is not None:
        images_per_sample = [s.num_images for s in samples]
        queries = retrieval_queries(batch, samples)
        aux = probes.loss(
            out.hidden_states, batch["input_ids"], batch["pixel_values"], images_per_sample, queries
        ) + retrieval_loss(model, out.hidden_states, batch, queries)
    return loss, aux, right.mean()


@torch.no_grad()
def evaluate(model, samples, *, batch_size: int = 8, max_new_tokens: int = 3):
    """Greedy full-cache accuracy per task: ``{task: accuracy}`` plus ``"all"``."""
    model.eval()
    hits: dict[str, list[bool]] = {}
    ordered = sorted(samples, key=lambda s: len(s.input_ids))
    for i in range(0, len(ordered), batch_size):
        chunk = ordered[i : i + batch_size]
        batch = hs.collate(chunk)
        out = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=hs.PAD_TOKEN_ID,
            eos_token_id=hs.EOS_TOKEN_ID,
        )
        new = out[:, batch["input_ids"].shape[1] :]
        for s, ids in zip(chunk, new, strict=True):
            hits.setdefault(s.task, []).append(hs.score(ids, s))
    acc = {t: sum(v) / len(v) for t, v in sorted(hits.items())}
    acc["all"] = sum(sum(v) for v in hits.values()) / max(1, len(samples))
    return acc


def save_pretrained(model, out: Path) -> None:
    """Write model (safetensors), tokenizer, processor and generation config to ``out``."""
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=hs.BOS_TOKEN_ID,
        eos_token_id=hs.EOS_TOKEN_ID,
        pad_token_id=hs.PAD_TOKEN_ID,
        do_sample=False,
        max_new_tokens=3,
    )
    model.save_pretrained(out)
    hs.build_processor().save_pretrained(out)  # also writes the tokenizer files


def _resolved(path: Path | None) -> Path | None:
    return None if path is None else Path(path).resolve()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "assets" / "tiny_llava")
    p.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR)
    p.add_argument("--steps", type=int, default=8000)
    p.add_argument("--batch-tokens", type=int, default=4096, help="prompt tokens per batch")
    p.add_argument("--max-images", type=int, default=40)
    p.add_argument("--hold", type=float, default=0.35, help="fraction of steps at 2 images")
    p.add_argument("--ramp", type=float, default=0.8, help="fraction of steps to reach max")
    p.add_argument(
        "--advance-at", type=float, default=0.85, help="train accuracy that grows the prompts"
    )
    p.add_argument("--questions", type=int, default=8, help="questions per training prompt")
    p.add_argument("--aux-weight", type=float, default=0.5, help="auxiliary probe loss weight")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (others share the CPU)")
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--eval-n", type=int, default=400, help="held-out samples at the end")
    p.add_argument(
        "--init",
        type=Path,
        help="fine-tune: start from this saved model (its --hidden/--layers) instead of random "
        "weights; probes and optimizer start fresh",
    )
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    p.add_argument(
        "--export-only", action="store_true", help="save + evaluate the checkpoint, no training"
    )
    args = p.parse_args(argv)
    if args.aux_weight > 0 and args.layers <= RETRIEVAL_LAYER:
        p.error(
            f"--layers {args.layers}: the auxiliary losses read decoder layer {RETRIEVAL_LAYER}, "
            f"so --layers must be >= {RETRIEVAL_LAYER + 1} (or --aux-weight 0)"
        )

    from transformers import LlavaForConditionalGeneration

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    state_path = args.work_dir / "state.pt"

    if args.init is None:
        model = LlavaForConditionalGeneration(build_config(hidden=args.hidden, layers=args.layers))
    else:
        model = LlavaForConditionalGeneration.from_pretrained(args.init, local_files_only=True)
        shape = (model.config.text_config.hidden_size, model.config.text_config.num_hidden_layers)
        if shape != (args.hidden, args.layers):
            p.error(
                f"--init {args.init} has hidden size {shape[0]} and {shape[1]} layers, but "
                f"--hidden {args.hidden} --layers {args.layers}: they must match"
            )
    model.config.use_cache = True
    text = model.config.text_config
    probes = AuxiliaryProbes(text.hidden_size, text.vocab_size) if args.aux_weight > 0 else None
    params = [*model.parameters(), *(probes.parameters() if probes is not None else ())]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        frac = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))

    start, elapsed, frontier = 0, 0.0, 2
    ema_loss, ema_acc = None, None
    if state_path.exists() and not args.fresh:
        state = torch.load(state_path, weights_only=False)
        if _resolved(state["args"].get("init")) != _resolved(args.init):
            p.error(
                f"--work-dir {args.work_dir} holds a run with --init {state['args'].get('init')}, "
                f"not --init {args.init}: pass --fresh to start over or another --work-dir"
            )
        model.load_state_dict(state["model"])
        if probes is not None:
            probes.load_state_dict(state["probes"])
        opt.load_state_dict(state["opt"])
        start, elapsed = state["step"], state["elapsed"]
        frontier, ema_loss, ema_acc = state["frontier"], state["ema_loss"], state["ema_acc"]
        torch.set_rng_state(state["torch_rng"])
        print(f"resuming from {state_path} at step {start} ({elapsed / 60:.1f} min so far)")

    def checkpoint(step: int) -> None:
        tmp = state_path.with_suffix(".tmp")
        torch.save(
            {
                "model": model.state_dict(),
                "probes": probes.state_dict() if probes is not None else None,
                "opt": opt.state_dict(),
                "step": step,
                "elapsed": elapsed,
                "frontier": frontier,
                "ema_loss": ema_loss,
                "ema_acc": ema_acc,
                "torch_rng": torch.get_rng_state(),
                "args": vars(args),
            },
            tmp,
        )
        tmp.replace(state_path)

    model.train()
    end = start if args.export_only else args.steps
    bar = tqdm(range(start, end), initial=start, total=args.steps, dynamic_ncols=True)
    t0 = time.perf_counter()
    for step in bar:
        floor = curriculum_floor(step, args.steps, args.hold, args.ramp, args.max_images)
        if step % 10 == 0 and ema_acc is not None and ema_acc >= args.advance_at:
            frontier += 1
        frontier = min(args.max_images, max(frontier, floor))
        samples = batch_for_step(step, frontier, args)
        batch = hs.collate(samples, with_answers=True)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss, aux, right = training_loss(model, probes, batch, samples)
        (loss + args.aux_weight * aux).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        acc = right.item()
        ema_loss = loss.item() if ema_loss is None else 0.95 * ema_loss + 0.05 * loss.item()
        ema_acc = acc if ema_acc is None else 0.95 * ema_acc + 0.05 * acc
        bar.set_postfix(
            frontier=frontier,
            imgs=samples[0].num_images,
            loss=f"{ema_loss:.3f}",
            aux=f"{aux.item():.2f}",
            acc=f"{ema_acc:.2f}",
        )
        if (step + 1) % args.save_every == 0 or step + 1 == end:
            elapsed += time.perf_counter() - t0
            t0 = time.perf_counter()
            checkpoint(step + 1)
    elapsed += time.perf_counter() - t0
    bar.close()
    print(f"training time: {elapsed / 60:.1f} min at step {end} ({args.threads} thread(s))")

    save_pretrained(model, args.out)
    size = (args.out / "model.safetensors").stat().st_size / 2**20
    print(f"saved to {args.out} ({size:.1f} MiB)")

    t_eval = time.perf_counter()
    test = hs.make_split("test", args.eval_n, seed=0)
    acc = evaluate(model, test)
    report = {
        "accuracy": acc,
        "eval_n": args.eval_n,
        "step": end,
        "train_minutes": elapsed / 60,
        "eval_seconds": time.perf_counter() - t_eval,
        "args": {k: str(v) for k, v in vars(args).items()},
        "model_mib": size,
    }
    print(json.dumps(report["accuracy"], indent=2))
    (args.work_dir / "eval.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
