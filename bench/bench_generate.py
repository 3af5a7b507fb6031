"""End-to-end ``generate`` on a long-context random-weight LLaVA: unmodified transformers (sdpa,
full cache) vs ``csp_inductor.compile(model, CSP(budget))``, and, where NVIDIA kvpress is
installed (``make bench-peers``), unmodified transformers under kvpress's
``SnapKVPress(compression_ratio=1 - budget)``.

The model (:func:`csp_inductor.testing.long_context_llava`): Llama decoder, hidden 1024,
8 layers, 16 query / 4 KV heads, fp32, a tiny CLIP tower; the prompt
(:func:`csp_inductor.testing.image_heavy_prompt`): ``CSP_BENCH_CONTEXT`` tokens (default
16384), 85% of them image tokens (576 per image) between text runs; ``CSP_BENCH_NEW_TOKENS``
(default 64) greedy new tokens.

Each provider runs in a fresh subprocess (``python bench/bench_generate.py --provider ...``),
one after the other in the same pytest run, and reports:

- ``compile_s``: a warm-up ``generate`` on a 1024-token prompt (for CSP: the compilation of the
  prefill and decode graphs; for the unmodified model: eager warm-up);
- ``prefill_s``: start of ``generate`` to the first logits (a logits processor timestamps
  every step); ``decode_tok_s``: the remaining ``new_tokens - 1`` steps per second;
- ``phase_ms``: totals of the ``csp::`` profiler labels (scoring, selection = scoring + top-k,
  compaction) over all layers, from ``torch.profiler`` around the whole ``generate`` (both
  providers run under it); ``csp_overhead`` = (selection + compaction) / prefill_s;
- ``bound_ms``: the bytes bound of a decode step: the bytes it reads (the decoder's and the
  LM head's weights, one embedding row, the KV it attends over) over the read bandwidth the
  worker measures (a sum over a 512 MiB tensor, best of 5); ``decode_vs_bound`` = the
  measured ms per token over it (not for ``csp_tp``);
- ``kv_bytes``: bytes of the cache's K/V tensors after ``generate``; for CSP also ``kept``,
  ``capacity`` and ``kv_bytes_per_token``, with the check kv_bytes == capacity × per token;
- ``peak_rss_growth`` (``ru_maxrss`` growth during ``generate``, model and inputs allocated
  before the baseline) and ``held_rss_growth`` (RSS after ``generate``, freed heap trimmed,
  with the cache still referenced).

Sizes: ``CSP_BENCH_CONTEXT``, ``CSP_BENCH_NEW_TOKENS``, ``CSP_BENCH_BUDGET`` (0.2),
``CSP_BENCH_MODEL`` ("hidden,layers,heads,kv_heads", default 1024,8,16,4),
``CSP_BENCH_THREADS`` (1), ``CSP_BENCH_PROVIDERS`` (default "sdpa_full,csp", and "kvpress" where
kvpress imports). The CSP and kvpress results carry ``vs_full`` ratios to the unmodified model;
kvpress's carry ``kv_tokens``, the tokens its cache holds (measured: its count rounds
differently from ours).

``csp_tp`` (opt-in: ``CSP_BENCH_PROVIDERS=csp,csp_tp``): CSP on the same model split by
transformers' tensor-parallel plan over 2 processes (``torchrun``, gloo), one thread each; rank 0
reports, ``kv_bytes`` is one rank's; ``vs_one_process`` compares it with the ``csp`` row of the
same run (at ``CSP_BENCH_THREADS`` threads).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
PROVIDERS = ("sdpa_full", "csp", "kvpress", "csp_tp")
TP_RANKS = 2  # csp_tp: CSP on the model split over this many processes, one thread each


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _trim() -> None:
    gc.collect()
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(argv: list[str]) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--provider", choices=PROVIDERS, required=True)
    p.add_argument("--context", type=int, default=16384)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--budget", type=float, default=0.2)
    p.add_argument("--model", default="1024,8,16,4")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tp", action="store_true", help="under torchrun: split the model (TP plan)")
    args = p.parse_args(argv)
    # before the thread count: importing conftest sets its default
    from conftest import TokenClock, read_bandwidth, step_weight_bytes

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT))
    from transformers import LogitsProcessorList

    import csp_inductor
    from csp_inductor.profiling import profiled
    from csp_inductor.testing import image_heavy_prompt, long_context_llava

    hidden, layers, heads, kv_heads = (int(x) for x in args.model.split(","))
    model = long_context_llava(hidden, layers, heads, kv_heads)
    if args.tp:  # every rank built the same weights: each keeps its part
        from transformers.distributed import DistributedConfig

        config, _, mesh = model.prepare_distribute_model(
            DistributedConfig(tp_size=int(os.environ["WORLD_SIZE"]))
        )
        model = model.maybe_distribute_model(model, config, mesh)
    inputs = image_heavy_prompt(model, args.context)
    # no end-of-sequence token: every generate makes new_tokens without min_new_tokens, whose
    # logits processors scan the vocabulary at every step (a cost of the benchmark)
    model.generation_config.eos_token_id = None
    gen = dict(max_new_tokens=args.new_tokens, do_sample=False)
    pressing = contextlib.nullcontext  # what each generate runs under
    if args.provider == "csp":
        csp_inductor.compile(model, csp_inductor.CSP(budget=args.budget))
    elif args.provider == "kvpress":
        import kvpress

        press = kvpress.SnapKVPress(compression_ratio=1 - args.budget)
        pressing = lambda: press(model)  # noqa: E731
    start = time.perf_counter()
    warm = image_heavy_prompt(model, min(1024, args.context), seed=1)
    with pressing():
        model.generate(**warm, max_new_tokens=4, do_sample=False)
    compile_s = time.perf_counter() - start
    del warm
    _trim()
    rss_base, maxrss_base = _rss_bytes(), _maxrss()
    clock = TokenClock()
    with profiled() as prof, pressing():
        start = time.perf_counter()
        out = model.generate(
            **inputs, **gen, logits_processor=LogitsProcessorList([clock]),
            return_dict_in_generate=True,
        )  # fmt: skip
        end = time.perf_counter()
    peak = _maxrss() - maxrss_base
    cache = out.past_key_values
    del prof.profiler  # the profiler's event buffers are not part of what generate holds
    _trim()
    held = _rss_bytes() - rss_base
    prefill_s = clock.stamps[0] - start
    steps = len(clock.stamps) - 1
    decode_s = clock.stamps[-1] - clock.stamps[0]
    result = {
        "provider": args.provider,
        "context": int(inputs["input_ids"].shape[1]),
        "image_tokens": int((inputs["input_ids"] == model.config.image_token_id).sum()),
        "new_tokens": int(out.sequences.shape[1] - inputs["input_ids"].shape[1]),
        "model": {"hidden": hidden, "layers": layers, "heads": heads, "kv_heads": kv_heads,
                  "intermediate": model.config.text_config.intermediate_size,
                  "vocab": model.config.text_config.vocab_size, "dtype": "float32"},
        "threads": args.threads,
        "tp": int(os.environ["WORLD_SIZE"]) if args.tp else 1,
        "compile_s": compile_s,
        "generate_s": end - start,
        "prefill_s": prefill_s,
        "decode_tok_s": steps / decode_s if steps else None,
        "phase_ms": prof.phase_ms,
        "peak_rss_growth": peak,
        "held_rss_growth": held,
    }  # fmt: skip
    layers_kv = [(layer.keys, layer.values) for layer in cache.layers]
    result["kv_bytes"] = sum(k.nbytes + v.nbytes for k, v in layers_kv)
    if args.provider == "csp":
        sel = prof.phase_ms.get("csp::selection", 0.0)
        comp = prof.phase_ms.get("csp::compaction", 0.0)
        result.update(
            budget=args.budget,
            kept=cache.kept_prompt,
            capacity=int(cache.layers[0].keys.shape[2]),
            kv_bytes_per_token=cache.kv_bytes_per_token(),
            csp_overhead=(sel + comp) / 1e3 / prefill_s,
        )
        result["kv_bytes_check"] = (
            result["kv_bytes"] == result["capacity"] * result["kv_bytes_per_token"]
        )
    else:
        k0 = layers_kv[0][0]
        result["kv_bytes_per_token"] = 2 * layers * k0.shape[1] * k0.shape[3] * k0.element_size()
        result["kv_tokens"] = int(k0.shape[2])
    if steps and not args.tp:  # (a rank of a split model reads its part of the weights)
        # a step reads the weights and the KV it attends over: CSP's static buffers, or the
        # growing cache (its mean length over the steps)
        attended = result.get("capacity") or result["kv_tokens"] - steps / 2
        read = step_weight_bytes(model) + attended * result["kv_bytes_per_token"]
        bandwidth = read_bandwidth()
        result.update(
            read_bandwidth=bandwidth,
            bytes_per_step=read,
            bound_ms=1e3 * read / bandwidth,
            decode_ms_per_token=1e3 / result["decode_tok_s"],
        )
        result["decode_vs_bound"] = result["decode_ms_per_token"] / result["bound_ms"]
    return result


# --- pytest side ------------------------------------------------------------------------------
def _run(provider: str) -> dict:
    from conftest import env_int

    launch = [sys.executable]
    if provider == "csp_tp":
        launch += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(TP_RANKS)]
    args = [
        *launch, str(Path(__file__).resolve()), "--provider", provider.removesuffix("_tp"),
        "--context", str(env_int("CSP_BENCH_CONTEXT", 16384)),
        "--new-tokens", str(env_int("CSP_BENCH_NEW_TOKENS", 64)),
        "--budget", os.environ.get("CSP_BENCH_BUDGET", "0.2"),
        "--model", os.environ.get("CSP_BENCH_MODEL", "1024,8,16,4"),
        "--threads", "1" if provider == "csp_tp" else os.environ.get("CSP_BENCH_THREADS", "1"),
        *(["--tp"] if provider == "csp_tp" else []),
    ]  # fmt: skip
    proc = subprocess.run(args, capture_output=True, text=True, timeout=7200)
    for line in proc.stdout.splitlines():
        if line.startswith("GENERATE_JSON "):
            return json.loads(line.split(" ", 1)[1])
    raise RuntimeError(f"{provider} worker failed:\n{proc.stderr[-4000:]}")


_RESULTS: dict[str, dict] = {}

if "pytest" in sys.modules:
    import pytest

    try:
        import kvpress  # noqa: F401

        _DEFAULT = ("sdpa_full", "csp", "kvpress")
    except ImportError:  # kvpress needs transformers < 5.3: make bench-peers
        _DEFAULT = ("sdpa_full", "csp")
    _SELECTED = os.environ.get("CSP_BENCH_PROVIDERS", ",".join(_DEFAULT)).split(",")

    @pytest.mark.parametrize("provider", [p for p in PROVIDERS if p in _SELECTED])
    def test_generate(benchmark, provider):
        from conftest import record

        result = benchmark.pedantic(_run, args=(provider,), rounds=1, iterations=1)
        _RESULTS[provider] = result
        info = dict(result)
        full = _RESULTS.get("sdpa_full")
        if provider in ("csp", "kvpress") and full is not None:
            info["vs_full"] = {
                "decode_tok_s_ratio": result["decode_tok_s"] / full["decode_tok_s"],
                "prefill_s_ratio": result["prefill_s"] / full["prefill_s"],
                "kv_bytes_ratio": result["kv_bytes"] / full["kv_bytes"],
                "peak_rss_ratio": result["peak_rss_growth"] / max(1, full["peak_rss_growth"]),
                "held_rss_ratio": result["held_rss_growth"] / max(1, full["held_rss_growth"]),
            }
        one = _RESULTS.get("csp")
        if provider == "csp_tp" and one is not None:
            info["vs_one_process"] = {
                "threads": one["threads"],
                "decode_tok_s_ratio": result["decode_tok_s"] / one["decode_tok_s"],
                "prefill_s_ratio": result["prefill_s"] / one["prefill_s"],
                "kv_bytes_ratio": result["kv_bytes"] / one["kv_bytes"],
            }
        record(benchmark, **info)


if __name__ == "__main__":
    result = worker(sys.argv[1:])
    if os.environ.get("RANK", "0") == "0":  # (under torchrun, rank 0 reports)
        print("GENERATE_JSON " + json.dumps(result))
