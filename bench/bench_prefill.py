"""Prefill cost of CSP's scoring, one layer: the unpruned causal attention vs attention + scores.

One layer's prompt attention at L tokens (fp32, head_dim 64, 85% image tokens), budget 0.2
(the paper's window, W = 0.1·L queries). Providers, alternated round by round in one process:

- ``attention``: SDPA's causal CPU kernel alone, what an unpruned prefill runs;
- ``csp``: the same attention, then CSP's scores (the CPU path: the scorer computes the
  window rows' maxima and sums itself);
- ``csp_lse``: the kernel's log-sum-exp handed to the scorer, which then skips them and scores
  only the keys before the recent window (what the FlexAttention path does);
- ``csp_shared``: what the CPU prefill runs (``csp_inductor::window_prefill``): the kernel on
  the first ``L - W`` rows only, the window rows' attention from the scorer's own logits;
- ``csp_shared_q{N}``: the same with ``CSP(query_window=N)``: N scoring queries, the same
  kept tokens.

Each row records ``overhead``: the provider's median per-round time ratio to ``attention``,
minus 1. Sizes: ``CSP_BENCH_PREFILL_CONTEXTS`` (default 4096,8192,16384),
``CSP_BENCH_PREFILL_HEADS`` (default ``8,8;16,4``: q heads, KV heads per shape),
``CSP_BENCH_PREFILL_ROUNDS`` (default 3), ``CSP_BENCH_PREFILL_QUERY_WINDOWS`` (default 64).
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import env_int, env_ints, interleaved, record

from csp_inductor import CSP
from csp_inductor.compaction import _scores_from_lse
from csp_inductor.policy_table import register_policy
from csp_inductor.scoring import decomposed_scores
from csp_inductor.testing import random_prompt

CONTEXTS = env_ints("CSP_BENCH_PREFILL_CONTEXTS", "4096,8192,16384")
HEADS = [
    tuple(int(x) for x in shape.split(","))
    for shape in os.environ.get("CSP_BENCH_PREFILL_HEADS", "8,8;16,4").split(";")
]
ROUNDS = env_int("CSP_BENCH_PREFILL_ROUNDS", 3)
QUERY_WINDOWS = env_ints("CSP_BENCH_PREFILL_QUERY_WINDOWS", "64")
HEAD_DIM = 64
POLICY = CSP(budget=0.2, query_window=0)  # the paper's window: W = 0.1·L queries


@pytest.mark.parametrize("context", CONTEXTS)
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"{h[0]}q{h[1]}kv")
def test_prefill_scoring_overhead(benchmark, heads, context):
    q_heads, kv_heads = heads
    p = random_prompt(1, q_heads, kv_heads, context, HEAD_DIM, layout="blocks")
    v = torch.randn_like(p.k)
    scale = HEAD_DIM**-0.5
    window = POLICY.budget_for(context).window
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu

    def attention():
        return flash(p.q, p.k, v, 0.0, True, scale=scale)

    def csp():
        attention()
        return decomposed_scores(p.q[:, :, -window:], p.k, p.is_image, n=POLICY.n, scale=scale)

    def reuse():
        _, lse = attention()
        return _scores_from_lse(POLICY, p.q, p.k, p.is_image, None, lse, scale)

    def window_prefill(policy):
        index = torch.tensor(register_policy(policy))
        op = torch.ops.csp_inductor.window_prefill
        return lambda: op(p.q, p.k, v, p.is_image, None, index, scale)

    shared = window_prefill(POLICY)
    providers = {"attention": attention, "csp": csp, "csp_lse": reuse, "csp_shared": shared}
    for n in QUERY_WINDOWS:
        providers[f"csp_shared_q{n}"] = window_prefill(CSP(budget=0.2, query_window=n))
    medians, ratios = interleaved(providers, ROUNDS, warmup=1)
    record(
        benchmark, provider="csp_shared",
        shapes={"q_heads": q_heads, "kv_heads": kv_heads, "head_dim": HEAD_DIM,
                "context": context, "window": window, "dtype": "float32"},
        interleaved_s=medians,
        overhead={name: 1 / ratios[name] - 1 for name in providers if name != "attention"},
    )  # fmt: skip
    benchmark.pedantic(shared, rounds=1, iterations=1)
