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
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: F401  (train.F: the tests spy on its cross_entropy)
from tqdm import tqdm

from csp_inductor.evaluation import haystack as hs
from csp_inductor.evaluation.builtin_model import evaluate, save_pretrained
from csp_inductor.evaluation.train_losses import (
    CELL_LAYER,
    PREVIOUS_LAYER,
    QUESTION_LAYER,
    QUESTION_SPAN,
    RETRIEVAL_LAYER,
    RETRIEVED_LAYER,
    AuxiliaryProbes,
    cell_labels,
    retrieval_loss,
    retrieval_queries,
    training_loss,
)

__all__ = [
    "CELL_LAYER",
    "DEFAULT_WORK_DIR",
    "PREVIOUS_LAYER",
    "QUESTION_LAYER",
    "QUESTION_SPAN",
    "RETRIEVAL_LAYER",
    "RETRIEVED_LAYER",
    "AuxiliaryProbes",
    "batch_for_step",
    "build_config",
    "cell_labels",
    "curriculum_floor",
    "evaluate",
    "main",
    "retrieval_loss",
    "retrieval_queries",
    "save_pretrained",
    "training_loss",
]


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


def _resolved(path: Path | None) -> Path | None:
    return None if path is None else Path(path).resolve()


def _parser() -> argparse.ArgumentParser:
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
    return p


def _model(p: argparse.ArgumentParser, args):
    """The model to train: a new one of ``--hidden`` and ``--layers``, or ``--init``'s."""
    from transformers import LlavaForConditionalGeneration

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
    return model


def _lr_at(step: int, args) -> float:
    """Linear warm-up over ``--warmup`` steps, then a cosine decay to 5% of ``--lr``."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


@dataclass
class _Progress:
    """Where a run stands, checkpointed with the weights: minutes spent, the curriculum
    frontier, the running answer loss and accuracy."""

    elapsed: float = 0.0
    frontier: int = 2
    ema_loss: float | None = None
    ema_acc: float | None = None


def _resume(p: argparse.ArgumentParser, args, state_path: Path, model, probes, opt):
    """``(first step, progress)``: of the checkpoint at ``state_path`` (loaded into ``model``,
    ``probes`` and ``opt``), or of a new run."""
    if not state_path.exists() or args.fresh:
        return 0, _Progress()
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
    progress = _Progress(elapsed, state["frontier"], state["ema_loss"], state["ema_acc"])
    torch.set_rng_state(state["torch_rng"])
    print(f"resuming from {state_path} at step {start} ({elapsed / 60:.1f} min so far)")
    return start, progress


def _checkpoint(state_path: Path, step: int, progress: _Progress, model, probes, opt, args):
    tmp = state_path.with_suffix(".tmp")
    torch.save(
        {
            "model": model.state_dict(),
            "probes": probes.state_dict() if probes is not None else None,
            "opt": opt.state_dict(),
            "step": step,
            "elapsed": progress.elapsed,
            "frontier": progress.frontier,
            "ema_loss": progress.ema_loss,
            "ema_acc": progress.ema_acc,
            "torch_rng": torch.get_rng_state(),
            "args": vars(args),
        },
        tmp,
    )
    tmp.replace(state_path)


def _train(args, model, probes, opt, params, start: int, progress: _Progress, state_path: Path):
    """Steps ``start`` to ``--steps`` (none with ``--export-only``), checkpointed every
    ``--save-every`` steps and at the end; returns the step it ends at."""
    model.train()
    end = start if args.export_only else args.steps
    bar = tqdm(range(start, end), initial=start, total=args.steps, dynamic_ncols=True)
    t0 = time.perf_counter()
    for step in bar:
        floor = curriculum_floor(step, args.steps, args.hold, args.ramp, args.max_images)
        if step % 10 == 0 and progress.ema_acc is not None and progress.ema_acc >= args.advance_at:
            progress.frontier += 1
        progress.frontier = min(args.max_images, max(progress.frontier, floor))
        samples = batch_for_step(step, progress.frontier, args)
        batch = hs.collate(samples, with_answers=True)
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, args)
        loss, aux, right = training_loss(model, probes, batch, samples)
        (loss + args.aux_weight * aux).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        acc, ema_loss, ema_acc = right.item(), progress.ema_loss, progress.ema_acc
        progress.ema_loss = (
            loss.item() if ema_loss is None else 0.95 * ema_loss + 0.05 * loss.item()
        )
        progress.ema_acc = acc if ema_acc is None else 0.95 * ema_acc + 0.05 * acc
        bar.set_postfix(
            frontier=progress.frontier,
            imgs=samples[0].num_images,
            loss=f"{progress.ema_loss:.3f}",
            aux=f"{aux.item():.2f}",
            acc=f"{progress.ema_acc:.2f}",
        )
        if (step + 1) % args.save_every == 0 or step + 1 == end:
            progress.elapsed += time.perf_counter() - t0
            t0 = time.perf_counter()
            _checkpoint(state_path, step + 1, progress, model, probes, opt, args)
    progress.elapsed += time.perf_counter() - t0
    bar.close()
    return end


def _export(args, model, elapsed: float, end: int) -> None:
    """Write the model to ``--out``; evaluate it on the held-out split into ``eval.json``."""
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


def main(argv: list[str] | None = None) -> None:
    p = _parser()
    args = p.parse_args(argv)
    if args.aux_weight > 0 and args.layers <= RETRIEVAL_LAYER:
        p.error(
            f"--layers {args.layers}: the auxiliary losses read decoder layer {RETRIEVAL_LAYER}, "
            f"so --layers must be >= {RETRIEVAL_LAYER + 1} (or --aux-weight 0)"
        )

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    state_path = args.work_dir / "state.pt"

    model = _model(p, args)
    text = model.config.text_config
    probes = AuxiliaryProbes(text.hidden_size, text.vocab_size) if args.aux_weight > 0 else None
    params = [*model.parameters(), *(probes.parameters() if probes is not None else ())]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    start, progress = _resume(p, args, state_path, model, probes, opt)
    end = _train(args, model, probes, opt, params, start, progress, state_path)
    print(
        f"training time: {progress.elapsed / 60:.1f} min at step {end} ({args.threads} thread(s))"
    )
    _export(args, model, progress.elapsed, end)


if __name__ == "__main__":
    main()
