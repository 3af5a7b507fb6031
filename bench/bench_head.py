"""The LM head of a decode step: MKL's matrix product vs the compiled multiply-and-sum.

A (vocab, hidden) weight times a few rows of hidden states, as a decode step of ``rows``
sequences runs it. Providers, alternated round by round in one process:

- ``linear``: ``F.linear``, what the model's own head runs (MKL's GEMV / GEMM on CPU);
- ``reduction``: the backend's compiled head
  (:class:`csp_inductor.backend.lm_head.CompiledHead`), one fused multiply-and-sum over the
  weight.

Each row records ``speedup`` (the median per-round ratio of ``linear`` to ``reduction``) and
the weight's read rate for both. These measurements set ``HEAD_REDUCTION_ROWS``: the rows up to
which the reduction is used, per dtype. Sizes: ``CSP_BENCH_HEAD_SHAPE`` ("vocab,hidden",
default ``32000,1024``), ``CSP_BENCH_HEAD_ROWS`` (default ``1,2,4,8``),
``CSP_BENCH_HEAD_ROUNDS`` (default 20).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import env_int, env_ints, interleaved, record

from csp_inductor.backend.lm_head import CompiledHead

VOCAB, HIDDEN = env_ints("CSP_BENCH_HEAD_SHAPE", "32000,1024")
ROWS = env_ints("CSP_BENCH_HEAD_ROWS", "1,2,4,8")
ROUNDS = env_int("CSP_BENCH_HEAD_ROUNDS", 20)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_head_reduction_vs_linear(benchmark, dtype, rows):
    head = torch.nn.Linear(HIDDEN, VOCAB, bias=False).to(dtype)
    compiled = CompiledHead(head).compiled  # (used whatever the rows, to measure past the limit)
    hidden = torch.randn(rows, HIDDEN).to(dtype)
    weight = head.weight.detach()

    def linear():
        return F.linear(hidden, weight)

    def reduction():
        return compiled(hidden, weight, None)

    torch.testing.assert_close(reduction(), linear(), rtol=2e-2, atol=2e-2)
    medians, ratios = interleaved({"linear": linear, "reduction": reduction}, ROUNDS, warmup=3)
    record(
        benchmark, provider="reduction",
        shapes={"vocab": VOCAB, "hidden": HIDDEN, "rows": rows, "dtype": str(dtype)},
        interleaved_s=medians, speedup=ratios["reduction"],
        read_gb_s={name: weight.nbytes / s / 1e9 for name, s in medians.items()},
    )  # fmt: skip
    benchmark.pedantic(reduction, rounds=5, iterations=1)
