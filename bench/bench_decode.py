"""Decode-step attention: the compacted CSP cache vs full-cache SDPA, one layer.

One new token (q_len 1) of one decoder layer of the long-context model (16 query / 4 KV heads,
head_dim 64, fp32) over a context of L prompt tokens. Providers:

- ``sdpa_full``: ``scaled_dot_product_attention(q, K, V, enable_gqa=True)`` over all L cached
  tokens, what unmodified transformers (sdpa) runs at decode;
- ``csp@b``: ``csp_inductor.attention.decode_attention`` (kernel "sdpa", the CPU choice) over
  the static buffers of a pruned cache: ``kept = CSP(budget=b).budget_for(L).kept`` prompt
  tokens plus 256 decode slots (the default decode capacity), valid-length mask.

Each CSP row records the interleaved ratio full/csp (same process, providers alternated) and
the KV bytes of the layer for both. Sizes: ``CSP_BENCH_DECODE_CONTEXTS`` (default
4096,8192,16384,32768), ``CSP_BENCH_BUDGETS`` (default 0.1,0.2), ``CSP_BENCH_HEADS``,
``CSP_BENCH_DECODE_ROUNDS`` (default 50).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import env_floats, env_int, env_ints, interleaved, record

from csp_inductor import CSP
from csp_inductor.attention import decode_attention
from csp_inductor.compile import DEFAULT_DECODE_CAPACITY

CONTEXTS = env_ints("CSP_BENCH_DECODE_CONTEXTS", "4096,8192,16384,32768")
BUDGETS = env_floats("CSP_BENCH_BUDGETS", "0.1,0.2")
Q_HEADS, KV_HEADS, HEAD_DIM = env_ints("CSP_BENCH_HEADS", "16,4,64")
ROUNDS = env_int("CSP_BENCH_DECODE_ROUNDS", 50)


def _full(context: int):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, Q_HEADS, 1, HEAD_DIM, generator=gen)
    k = torch.randn(1, KV_HEADS, context, HEAD_DIM, generator=gen)
    v = torch.randn(1, KV_HEADS, context, HEAD_DIM, generator=gen)
    return q, k, v, lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def _csp(q: torch.Tensor, context: int, budget: float):
    kept = CSP(budget=budget).budget_for(context).kept
    capacity = kept + DEFAULT_DECODE_CAPACITY
    gen = torch.Generator().manual_seed(1)
    keys = torch.randn(1, KV_HEADS, capacity, HEAD_DIM, generator=gen)
    values = torch.randn(1, KV_HEADS, capacity, HEAD_DIM, generator=gen)
    lengths = torch.tensor([kept])  # the new token's slot is kept; earlier decode slots empty
    positions = torch.zeros(1, KV_HEADS, capacity, dtype=torch.long)
    seen = torch.tensor(context)

    def run():
        return decode_attention(
            q, keys, values, lengths=lengths, positions=positions, seen=seen,
            scale=HEAD_DIM**-0.5, sliding_window=None, kernel="sdpa",
        )  # fmt: skip

    return kept, keys, run


def _shapes(context: int) -> dict:
    return {"q_heads": Q_HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "context": context,
            "q_len": 1, "batch": 1, "dtype": "float32"}  # fmt: skip


@pytest.mark.parametrize("context", CONTEXTS)
def test_decode_sdpa_full(benchmark, context):
    _q, k, v, run = _full(context)
    record(benchmark, shapes=_shapes(context), provider="sdpa_full",
           kv_bytes=k.nbytes + v.nbytes, kv_tokens=context)  # fmt: skip
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=3)


@pytest.mark.parametrize("context", CONTEXTS)
@pytest.mark.parametrize("budget", BUDGETS)
def test_decode_csp(benchmark, budget, context):
    q, k, v, full = _full(context)
    kept, keys, run = _csp(q, context, budget)
    medians, ratios = interleaved({"sdpa_full": full, "csp": run}, ROUNDS, warmup=3)
    per_token = 2 * KV_HEADS * HEAD_DIM * 4
    record(
        benchmark, shapes=_shapes(context), provider=f"csp@{budget}", budget=budget,
        kept=kept, capacity=keys.shape[2], kv_bytes=2 * keys.nbytes,
        kv_bytes_full=k.nbytes + v.nbytes, kv_bytes_per_token=per_token,
        interleaved_s=medians, speedup_vs_full=ratios["csp"],
    )  # fmt: skip
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1, warmup_rounds=3)
