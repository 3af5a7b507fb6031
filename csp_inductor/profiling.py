"""Profiling: ``torch.profiler`` around a run, with the library's phases labelled
(:mod:`csp_inductor.labels` names them).

``python -m csp_inductor profile [options]`` profiles ``generate`` on a random-weight
long-context LLaVA (:func:`long_context_llava`, :func:`image_heavy_prompt`) and writes a Chrome
trace plus a key-averages table (see :func:`main` for the options).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .labels import PREFIX


@dataclass
class Profile:
    """What :func:`profiled` leaves behind once its block has run."""

    profiler: torch.profiler.profile | None = None
    trace: Path | None = None
    table: str = ""
    seconds: float = 0.0
    phase_ms: dict[str, float] = field(default_factory=dict)


def phase_times(profiler: torch.profiler.profile) -> dict[str, float]:
    """Total CPU milliseconds of every ``csp::`` label (all calls, all layers)."""
    out: dict[str, float] = {}
    for event in profiler.key_averages():
        if event.key.startswith(PREFIX):
            out[event.key] = event.cpu_time_total / 1e3
    return out


@contextlib.contextmanager
def profiled(
    out_dir: str | Path | None = None,
    *,
    name: str = "csp",
    sort_by: str = "cpu_time_total",
    row_limit: int = 30,
    record_shapes: bool = False,
    profile_memory: bool = False,
) -> Iterator[Profile]:
    """Run the block under ``torch.profiler`` (CPU activities; CUDA too when available).

    On exit fills the yielded :class:`Profile`: the key-averages table (sorted by ``sort_by``),
    the wall time, the ``csp::`` phase totals, and, when ``out_dir`` is given, writes
    ``<name>.trace.json`` (open in chrome://tracing or Perfetto) and ``<name>.table.txt`` there.
    """
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    result = Profile()
    prof = torch.profiler.profile(
        activities=activities, record_shapes=record_shapes, profile_memory=profile_memory
    )
    start = time.perf_counter()
    with prof:
        yield result
    result.seconds = time.perf_counter() - start
    result.profiler = prof
    result.table = prof.key_averages().table(sort_by=sort_by, row_limit=row_limit)
    result.phase_ms = phase_times(prof)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        result.trace = out / f"{name}.trace.json"
        prof.export_chrome_trace(str(result.trace))
        (out / f"{name}.table.txt").write_text(result.table + "\n")


# --- the long-context configuration shared with bench/bench_generate.py ----------------------
def long_context_llava(
    hidden: int = 1024,
    layers: int = 8,
    heads: int = 16,
    kv_heads: int = 4,
    intermediate: int | None = None,
    vocab: int = 32000,
    max_positions: int = 65536,
    seed: int = 0,
):
    """A random-weight LLaVA whose language model is big enough that attention matters at long
    context (Llama decoder, GQA), with a tiny one-layer CLIP tower (its cost is not the point):
    fp32, eval, sdpa. Image placeholders are token ``vocab - 1``; 576 tokens per image."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    from transformers import LlavaForConditionalGeneration as Llava

    vision = CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
        image_size=336, patch_size=14, projection_dim=64,
    )  # fmt: skip
    text = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate or 11 * hidden // 4,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions, rope_parameters={"rope_type": "default",
        "rope_theta": 500000.0},
    )  # fmt: skip
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=vocab - 1,
        vision_feature_select_strategy="default", vision_feature_layer=-1,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = Llava(config)
    model.set_attn_implementation("sdpa")
    return model.float().eval()


TOKENS_PER_IMAGE = (336 // 14) ** 2


def image_heavy_prompt(model, context: int, image_share: float = 0.85, seed: int = 0) -> dict:
    """``generate`` kwargs for a ``context``-token prompt of :func:`long_context_llava`: as many
    576-token images as fit in ``image_share`` of it, separated by text runs."""
    gen = torch.Generator().manual_seed(seed)
    image_id = model.config.image_token_id
    images = max(1, int(context * image_share) // TOKENS_PER_IMAGE)
    text = context - images * TOKENS_PER_IMAGE
    if text < images + 1:
        raise ValueError(f"context={context} is too short for {images} images plus text")
    runs = [text // (images + 1)] * (images + 1)
    runs[-1] += text - sum(runs)
    parts = []
    for i, n in enumerate(runs):
        if i:
            parts.append(torch.full((TOKENS_PER_IMAGE,), image_id))
        parts.append(torch.randint(3, image_id - 1, (n,), generator=gen))
    ids = torch.cat(parts)[None]
    size = model.config.vision_config.image_size
    pixels = torch.randn(images, 3, size, size, generator=gen)
    return dict(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids))


# --- command line ---------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m csp_inductor profile",
        description="Profile generate on a random-weight long-context LLaVA: Chrome trace + "
        "key-averages table, with csp:: phase totals.",
    )
    p.add_argument("--context", type=int, default=4096, help="prompt tokens (default 4096)")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens to generate (default 16)")
    p.add_argument("--policy", default="csp", help="csp | snapkv | h2o | ... | none (unmodified)")
    p.add_argument("--budget", type=float, default=0.2, help="kept fraction (default 0.2)")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--kernel", default="auto", choices=("auto", "sdpa", "flex"))
    p.add_argument("--eager", action="store_true", help="no torch.compile (attention labels)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--out", default="profile_out", help="directory for trace/table/summary")
    p.add_argument("--sort-by", default="cpu_time_total", help="key-averages sort column")
    p.add_argument("--row-limit", type=int, default=30)
    p.add_argument("--record-shapes", action="store_true")
    p.add_argument("--profile-memory", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    """``python -m csp_inductor profile``: returns a process exit code."""
    args = _parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import csp_inductor
    from csp_inductor.policies import make_policy

    model = long_context_llava(args.hidden, args.layers, args.heads, args.kv_heads)
    inputs = image_heavy_prompt(model, args.context)
    gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    summary: dict = {"args": vars(args)}
    if args.policy != "none":
        options = {} if args.policy == "full" else {"budget": args.budget}
        policy = make_policy(args.policy, **options)
        csp_inductor.compile(model, policy, kernel=args.kernel, compile=not args.eager)
        # compile (or warm up) on a short prompt outside the profiled region
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(**image_heavy_prompt(model, min(args.context, 2048), seed=1), **gen)
        summary["warmup_s"] = time.perf_counter() - start
    with torch.inference_mode(), profiled(
        args.out, name=f"{args.policy}_{args.context}", sort_by=args.sort_by,
        row_limit=args.row_limit, record_shapes=args.record_shapes,
        profile_memory=args.profile_memory,
    ) as prof:  # fmt: skip
        model.generate(**inputs, **gen)
    summary.update(wall_s=prof.seconds, phase_ms=prof.phase_ms, trace=str(prof.trace))
    backend = getattr(model, "csp_backend", None)
    if backend is not None:
        summary["kv_bytes"] = backend.cache.nbytes()
        summary["kept_prompt"] = backend.cache.kept_prompt
    print(prof.table)
    print(json.dumps(summary, indent=1, default=str))
    (Path(args.out) / f"{args.policy}_{args.context}.summary.json").write_text(
        json.dumps(summary, indent=1, default=str) + "\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
