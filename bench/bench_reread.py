"""What question-agnostic scoring costs: the prompt's re-read as a fraction of the prefill.

The model is :func:`csp_inductor.testing.long_context_llava` (random weights, fp32,
``CSP_BENCH_REREAD_MODEL``, default ``512,4,8,8``: hidden, layers, heads, KV heads), compiled
once by ``csp_inductor.compile``; the prompt is image-heavy
(:func:`csp_inductor.testing.image_heavy_prompt`), ``CSP_BENCH_REREAD_CONTEXTS`` tokens
(default 2048,4096). Timed: one forward of the prompt into a new cache (the prefill, its
scoring and compaction, and for the question-agnostic policies the re-read and the pruning of
the held prompt). Providers, on one backend (its policy switched, not recompiled), alternated
round by round: ``full`` (``Full()``: the prefill alone, nothing scored), ``csp``
(``CSP(0.2)``: window scoring), ``csp_reconstruct`` (``CSP(0.2, scoring="reconstruct")``) and
``kvzip`` (``KVzip(0.2)``). Each row records the median per-round ratio of every provider to
``full`` (``vs_full``); ``reread_fraction`` = ``csp_reconstruct`` / ``full`` − 1, the re-read's
cost as a fraction of the prefill. ``CSP_BENCH_REREAD_ROUNDS`` (default 2) rounds.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import env_int, env_ints, interleaved, record

import csp_inductor
from csp_inductor import CSP, Full, KVzip
from csp_inductor.testing import image_heavy_prompt, long_context_llava

MODEL = tuple(int(x) for x in os.environ.get("CSP_BENCH_REREAD_MODEL", "512,4,8,8").split(","))
CONTEXTS = env_ints("CSP_BENCH_REREAD_CONTEXTS", "2048,4096")
ROUNDS = env_int("CSP_BENCH_REREAD_ROUNDS", 2)
POLICIES = {
    "full": Full(),
    "csp": CSP(budget=0.2),
    "csp_reconstruct": CSP(budget=0.2, scoring="reconstruct"),
    "kvzip": KVzip(budget=0.2),
}


@pytest.fixture(scope="module")
def model():
    hidden, layers, heads, kv_heads = MODEL
    model = long_context_llava(hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads)
    return csp_inductor.compile(model, Full())


@pytest.mark.parametrize("context", CONTEXTS)
def test_reread_cost(benchmark, model, context):
    backend = model.csp_backend
    prompt = image_heavy_prompt(model, context)

    def prefill(policy):
        def run():
            backend.policy = policy
            with torch.no_grad():
                model(**prompt, **{backend.cache_arg: backend.new_cache(8)})
            return backend.cache.kept_prompt

        return run

    providers = {name: prefill(policy) for name, policy in POLICIES.items()}
    medians, ratios = interleaved(providers, ROUNDS, warmup=1)
    kept = {name: run() for name, run in providers.items()}
    assert all(
        kept[name][0] <= 0.2 * context < kept["full"][0] for name in POLICIES if name != "full"
    )
    record(
        benchmark, provider="csp_reconstruct",
        shapes={"model": MODEL, "context": context, "budget": 0.2, "dtype": "float32"},
        interleaved_s=medians, vs_full={name: 1 / r for name, r in ratios.items()},
        reread_fraction=1 / ratios["csp_reconstruct"] - 1, graphs=backend.graphs,
    )  # fmt: skip
    benchmark.pedantic(providers["csp_reconstruct"], rounds=1, iterations=1)
