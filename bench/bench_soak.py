"""Soak: many compiled ``generate`` calls on the built-in model with everything that varies in
real use drawn at random per call (batch size, prompt lengths, policy, ``max_new_tokens``).

Pass criteria: no call fails, the compiler never falls back, the number of compiled graphs
stays bounded (prefill and decode, for batch 1 and batch > 1), and RSS is flat (no leak: RSS
after calls 100, 250 and 500 is recorded and its growth from call 100 on is bounded).

    pytest bench/bench_soak.py --benchmark-json bench/results/soak.json
"""

from __future__ import annotations

import gc
import random
import time

import torch
from conftest import env_int, record

import csp_inductor
from csp_inductor import CSP, H2O, Full, SnapKV, StreamingLLM
from csp_inductor.evaluation import haystack as hs

CALLS = env_int("CSP_BENCH_SOAK_CALLS", 500)
CHECKPOINTS = sorted({c for c in (100, 250, 500) if c <= CALLS} | {CALLS})
POLICIES = (CSP(), CSP(budget=0.1), SnapKV(), H2O(budget=0.3), StreamingLLM(), Full())
MAX_GRAPHS = 4  # prefill and decode, each for batch 1 and batch > 1
MAX_RSS_GROWTH = 64 * 2**20  # from call 100 to the last call


def rss() -> int:
    """Resident set size in bytes (Linux)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmRSS in /proc/self/status")


def random_call(rng: random.Random) -> tuple[dict, object, int]:
    size = rng.randint(1, 4)
    samples = [
        hs.make_sample(rng.choice(hs.TASKS), rng.randrange(10**6), num_images=rng.randint(2, 16))
        for _ in range(size)
    ]
    return hs.collate(samples), rng.choice(POLICIES), rng.randint(1, 12)


def test_soak_compiled_generate(benchmark):
    model = csp_inductor.compile(hs.load_builtin_model())
    backend = model.csp_backend
    rng = random.Random(0)
    stats = {"failures": [], "rss_mib": {}, "tokens": 0, "prompt_tokens": 0, "batch_sizes": {}}

    def soak():
        start = time.perf_counter()
        for call in range(1, CALLS + 1):
            inputs, policy, new = random_call(rng)
            backend.policy = policy
            try:
                out = model.generate(
                    **inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                    pad_token_id=hs.PAD_TOKEN_ID,
                )  # fmt: skip
                stats["tokens"] += out.shape[0] * new
            except Exception as error:  # a soak counts failures instead of stopping at one
                stats["failures"].append(f"call {call}: {type(error).__name__}: {error}")
            size = inputs["input_ids"].shape[0]
            stats["batch_sizes"][size] = stats["batch_sizes"].get(size, 0) + 1
            stats["prompt_tokens"] += int(inputs["attention_mask"].sum())
            if call in CHECKPOINTS:
                gc.collect()
                stats["rss_mib"][call] = round(rss() / 2**20, 1)
        stats["seconds"] = round(time.perf_counter() - start, 1)

    try:
        benchmark.pedantic(soak, rounds=1, iterations=1)
    finally:
        csp_inductor.restore(model)
        torch._dynamo.reset()
    rss_mib = stats["rss_mib"]
    growth = rss_mib[CHECKPOINTS[-1]] - rss_mib[CHECKPOINTS[0]]
    record(
        benchmark, calls=CALLS, graphs=backend.graphs, fallback=backend.fallback,
        rss_growth_mib=round(growth, 1), **stats,
    )  # fmt: skip
    print(
        f"\n{CALLS} calls in {stats['seconds']} s: {len(stats['failures'])} failures, "
        f"{backend.graphs} graphs, RSS MiB {rss_mib}, batch sizes {stats['batch_sizes']}"
    )
    assert stats["failures"] == []
    assert backend.fallback is None
    assert backend.graphs <= MAX_GRAPHS
    assert growth * 2**20 <= MAX_RSS_GROWTH, rss_mib
