"""Prompts larger than memory: a streamed prefill's peak memory and time against the prompt's
length, in one process.

The model is :func:`csp_inductor.testing.long_context_llava` (random weights, fp32,
``CSP_BENCH_STREAM_MODEL``, default ``512,4,8,8``: hidden, layers, heads, KV heads), its prompts
image-heavy (:func:`csp_inductor.testing.image_heavy_prompt`: 85% of the tokens are 576-token
images). Providers, compiled, each prompt answered with one token (``generate``):

- ``stream``: ``CSP(0.2)`` with ``max_cache_tokens=CSP_BENCH_STREAM_BOUND`` (4096) and
  ``prefill_chunk=CSP_BENCH_STREAM_CHUNK`` (1024), at ``CSP_BENCH_STREAM_CONTEXTS``
  (16k, 32k, 64k, 128k tokens);
- ``csp``: ``CSP(0.2)`` prefilled whole, and ``unmodified`` (transformers, sdpa), at the
  contexts up to ``CSP_BENCH_STREAM_WHOLE_MAX`` (32k: beyond it they take minutes per prompt on
  two cores, and memory the stream does not).

Measured per provider and context: the prefill's seconds per prompt token, and its peak RSS:
the high-water mark is reset (``/proc/self/clear_refs``) with the prompt's inputs (ids and
pixels, the caller's) already allocated and freed memory given back (``malloc_trim``), so
``peak_growth`` is what the prefill itself adds (glibc's mmap threshold fixed: see ``LIBC``);
``peak_rss`` is the absolute mark (the inputs, the model, the runtime). Each provider runs
its prompts in turn, shortest first, after a compile warm-up at 8k; the stream runs first.
The record's ``stream`` figures: ``peak_growth_vs_first``, ``peak_rss_vs_first`` and
``per_token_vs_first``, each context's against the smallest's.
"""

from __future__ import annotations

import ctypes
import gc
import os
import time
from pathlib import Path

import torch
from conftest import env_int, env_ints, record

import csp_inductor
from csp_inductor.testing import image_heavy_prompt, long_context_llava

MODEL = tuple(int(x) for x in os.environ.get("CSP_BENCH_STREAM_MODEL", "512,4,8,8").split(","))
CONTEXTS = env_ints("CSP_BENCH_STREAM_CONTEXTS", "16384,32768,65536,131072")
WHOLE_MAX = env_int("CSP_BENCH_STREAM_WHOLE_MAX", 32768)
BOUND = env_int("CSP_BENCH_STREAM_BOUND", 4096)
CHUNK = env_int("CSP_BENCH_STREAM_CHUNK", 1024)
POLICY = csp_inductor.CSP(budget=0.2)
STATUS = Path("/proc/self/status")
LIBC = ctypes.CDLL(None)
# glibc raises its mmap threshold after each large free, so later buffers of a chunk's size
# come from the heap and stay resident as it fragments: the peak then grows with the number
# of chunks, not with what is live. A fixed threshold (128 KiB, glibc's initial one) measures
# what is live (M_MMAP_THRESHOLD = -3).
LIBC.mallopt(-3, 128 * 1024)


def _status(field: str) -> int:
    """Bytes of a ``/proc/self/status`` field (VmHWM, VmRSS)."""
    for line in STATUS.read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in {STATUS}")


def _prefill(model, prompt: dict) -> dict:
    """One prompt answered with one token: seconds, peak RSS growth and mark, KV bytes held."""
    gc.collect()
    LIBC.malloc_trim(0)  # freed memory back to the system: the RSS is what is live
    STATUS.with_name("clear_refs").write_text("5")  # the high-water mark back to the RSS
    before = _status("VmRSS")
    start = time.perf_counter()
    model.generate(**prompt, max_new_tokens=1, do_sample=False)
    seconds = time.perf_counter() - start
    peak = _status("VmHWM")
    backend = getattr(model, "csp_backend", None)
    return {
        "seconds": seconds,
        "peak_growth": peak - before,
        "peak_rss": peak,
        "kv_bytes": None if backend is None else backend.cache.nbytes(),
        "held_tokens": None if backend is None else backend.cache.rows[0],
    }


def _model():
    return long_context_llava(*MODEL, max_positions=1 << 20)


def test_stream(benchmark):
    build = _model
    models = {
        "stream": csp_inductor.compile(
            build(), POLICY, max_cache_tokens=BOUND, prefill_chunk=CHUNK
        ),
        "csp": csp_inductor.compile(build(), POLICY),
        "unmodified": build(),
    }
    # the stream first, the prompts growing: what the others leave resident cannot hide its
    # peak; each provider's compilation (an 8k prompt) before its measurements
    runs: dict[str, dict[int, dict]] = {name: {} for name in models}
    for name, model in models.items():
        _prefill(model, image_heavy_prompt(model, 8192, seed=1))
        for context in CONTEXTS:
            if name == "stream" or context <= WHOLE_MAX:
                run = runs[name][context] = _prefill(model, image_heavy_prompt(model, context))
                run["ms_per_token"] = 1e3 * run["seconds"] / context
    stream = runs["stream"]
    first = stream[CONTEXTS[0]]
    for run in stream.values():
        run["peak_growth_vs_first"] = run["peak_growth"] / first["peak_growth"]
        run["peak_rss_vs_first"] = run["peak_rss"] / first["peak_rss"]
        run["per_token_vs_first"] = run["ms_per_token"] / first["ms_per_token"]
    record(
        benchmark, provider="stream", providers=runs, threads=torch.get_num_threads(),
        graphs=models["stream"].csp_backend.graphs,
        shapes={"model": MODEL, "contexts": CONTEXTS, "bound": BOUND, "chunk": CHUNK,
                "budget": POLICY.budget, "dtype": "float32", "image_share": 0.85},
    )  # fmt: skip
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
