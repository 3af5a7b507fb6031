"""Scoring: our fused CPU path vs the authors' dense approach, time and peak memory.

One decoder layer of the long-context model (16 query / 4 KV heads, head_dim 64), window
W = 0.1·L, ``blocks`` modality layout. Providers, both returning (1, kv_heads, 2, L) scores:

- ``fused``: ``csp_inductor.decomposed_scores`` (the registered op; on CPU the chunked torch
  path: complete causal rows of the W window queries in 32 MiB chunks, GQA folded in);
- ``dense``: ``csp_inductor.testing.authors_dense_scores``: (H, L, L) logits of every prompt
  query, an fp32 n-softmax copy, masked sums over the window rows. Skipped where its
  estimated peak (3 copies of H·L² fp32) exceeds 80% of MemAvailable.

Peak memory = growth of peak RSS (VmHWM) in a fresh subprocess (inputs allocated before the
baseline). The ``fused`` row records the interleaved time ratio dense/fused and the memory
ratio. Sizes: ``CSP_BENCH_SCORING_SEQS`` (default 2048,8192,16384), ``CSP_BENCH_HEADS``
(default 16,4,64 = q heads, kv heads, head_dim), ``CSP_BENCH_ROUNDS`` (default 3).
"""

from __future__ import annotations

import pytest
import torch
from conftest import env_int, env_ints, interleaved, mem_available, peak_rss_growth, record

import csp_inductor
from csp_inductor.testing import authors_dense_scores, random_prompt

SEQS = env_ints("CSP_BENCH_SCORING_SEQS", "2048,8192,16384")
Q_HEADS, KV_HEADS, HEAD_DIM = env_ints("CSP_BENCH_HEADS", "16,4,64")
ROUNDS = env_int("CSP_BENCH_ROUNDS", 3)
WINDOW_RATIO = 0.1

SETUP = """
import torch
import csp_inductor
from csp_inductor.testing import authors_dense_scores, random_prompt
torch.set_num_threads({threads})
p = random_prompt(1, {hq}, {hkv}, {seq}, {d}, layout="blocks")
window = {window}
q_window = p.q[:, :, {seq} - window:].contiguous()
"""
RUNS = {
    "fused": "csp_inductor.decomposed_scores(q_window, p.k, p.is_image, n=1.0)",
    "dense": "authors_dense_scores(p.q, p.k, p.is_image, window, n=1.0)",
}


def dense_fits(seq: int) -> bool:
    return 3 * Q_HEADS * seq * seq * 4 < 0.8 * mem_available()


def _inputs(seq: int):
    p = random_prompt(1, Q_HEADS, KV_HEADS, seq, HEAD_DIM, layout="blocks")
    window = int(seq * WINDOW_RATIO)
    return p, window, p.q[:, :, seq - window :].contiguous()


def _peak(provider: str, seq: int) -> int | None:
    setup = SETUP.format(
        threads=torch.get_num_threads(), hq=Q_HEADS, hkv=KV_HEADS, seq=seq, d=HEAD_DIM,
        window=int(seq * WINDOW_RATIO),
    )  # fmt: skip
    return peak_rss_growth(setup, RUNS[provider])


@pytest.mark.parametrize("seq", SEQS)
@pytest.mark.parametrize("provider", ["fused", "dense"])
def test_scoring(benchmark, provider, seq):
    if provider == "dense" and not dense_fits(seq):
        pytest.skip(f"dense (H, L, L) scoring needs ~{3 * Q_HEADS * seq * seq * 4 / 2**30:.0f} GiB")
    p, window, q_window = _inputs(seq)
    fns = {
        "fused": lambda: csp_inductor.decomposed_scores(q_window, p.k, p.is_image, n=1.0),
        "dense": lambda: authors_dense_scores(p.q, p.k, p.is_image, window, n=1.0),
    }
    info = {
        "shapes": {"q_heads": Q_HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "seq": seq,
                   "window": window, "dtype": "float32"},
        "provider": provider,
        "peak_rss_bytes": _peak(provider, seq),
    }  # fmt: skip
    if provider == "fused" and dense_fits(seq):
        medians, ratios = interleaved({"dense": fns["dense"], "fused": fns["fused"]}, ROUNDS)
        dense_peak = _peak("dense", seq)
        info.update(
            interleaved_s=medians,
            speedup_vs_dense=ratios["fused"],
            dense_peak_rss_bytes=dense_peak,
            memory_ratio_vs_dense=(
                dense_peak / info["peak_rss_bytes"]
                if dense_peak and info["peak_rss_bytes"]
                else None
            ),
        )
    record(benchmark, **info)
    benchmark.pedantic(fns[provider], rounds=ROUNDS, iterations=1, warmup_rounds=1)


if __name__ == "__main__":
    # ``python bench/bench_scoring.py``: only the peak-RSS probes, as JSON
    import json

    peaks = {
        f"{provider}-{seq}": _peak(provider, seq)
        for seq in SEQS
        for provider in ("fused", "dense")
        if provider == "fused" or dense_fits(seq)
    }
    print(json.dumps({"peak_rss_bytes": peaks, "threads": torch.get_num_threads()}))
