"""GPU benchmark of CSP window scoring: the fused Triton kernel against the authors' dense
approach and our chunked torch path, plus the n-softmax kernel against torch.

    python bench/bench_kernels_gpu.py [--seqs 2048 8192 16384] [--q-heads 32] [--kv-heads 32]
                                      [--head-dim 128] [--dtype float16] [--window-ratio 0.1]

Providers, all returning (batch, kv_heads, 2, seq) scores of one layer:

- ``triton``: ``decomposed_scores_triton`` (two passes, O(H·(W + L)) extra memory);
- ``chunked``: ``decomposed_scores_torch`` (window rows in chunks of complete causal rows);
- ``dense``: the authors' approach (``csp_inductor.testing.authors_dense_scores``): full
  (H, L, L) logits of every prompt query, an fp32 n-softmax copy, masked sums over the window.

Times are medians of ``triton.testing.do_bench``; ratios are provider time / triton time,
measured in the same run. Peak memory is the extra allocation of one call. A provider that
runs out of memory is reported as OOM.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys

import torch


def _setup(seq: int, q_heads: int, kv_heads: int, head_dim: int, dtype, window_ratio: float):
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, q_heads, seq, head_dim, device="cuda", dtype=dtype, generator=gen)
    k = torch.randn(1, kv_heads, seq, head_dim, device="cuda", dtype=dtype, generator=gen)
    period = max(2, seq // 5)  # runs of image tokens between text, as multi-image prompts have
    is_image = ((torch.arange(seq, device="cuda") % period) < period * 2 // 3)[None]
    window = max(1, int(seq * window_ratio))
    return q, k, is_image, window


def _providers(q, k, is_image, window, n: float):
    from csp_inductor.kernels.decomposed_scores import decomposed_scores_triton
    from csp_inductor.scoring import decomposed_scores_torch
    from csp_inductor.testing import authors_dense_scores

    seq, scale = k.shape[2], 1.0 / math.sqrt(q.shape[-1])
    q_window = q[:, :, seq - window :]
    return {
        "triton": lambda: decomposed_scores_triton(q_window, k, is_image, n, scale, None, None),
        "chunked": lambda: decomposed_scores_torch(q_window, k, is_image, n, scale, None, None),
        "dense": lambda: authors_dense_scores(q, k, is_image, window, n=n),
    }


def _measure(fn) -> tuple[float | None, float | None]:
    """(median ms, peak extra MiB) of ``fn``, or (None, None) when it runs out of memory."""
    import triton.testing

    torch.cuda.empty_cache()
    try:
        fn()  # compile / autotune outside the timed region
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None, None
    return ms, peak


def _fmt(x: float | None, spec: str) -> str:
    return "OOM" if x is None else format(x, spec)


def bench_scores(args) -> None:
    dtype = getattr(torch, args.dtype)
    print(
        f"\ndecomposed_scores: batch=1 q_heads={args.q_heads} kv_heads={args.kv_heads} "
        f"head_dim={args.head_dim} dtype={args.dtype} W=int({args.window_ratio}*L) n={args.n}"
    )
    header = f"{'L':>6} {'W':>5} {'provider':>8} {'ms':>9} {'peak MiB':>9} {'x triton':>8}"
    print(header)
    print("-" * len(header))
    for seq in args.seqs:
        q, k, is_image, window = _setup(
            seq, args.q_heads, args.kv_heads, args.head_dim, dtype, args.window_ratio
        )
        results = {
            name: _measure(fn) for name, fn in _providers(q, k, is_image, window, args.n).items()
        }
        base = results["triton"][0]
        for name, (ms, peak) in results.items():
            ratio = None if ms is None or base is None else ms / base
            print(
                f"{seq:>6} {window:>5} {name:>8} {_fmt(ms, '9.3f')} {_fmt(peak, '9.1f')} "
                f"{_fmt(ratio, '8.2f')}"
            )
        del q, k, is_image


def bench_n_softmax(args) -> None:
    from csp_inductor.kernels.n_softmax import n_softmax_triton
    from csp_inductor.scoring import n_softmax_torch

    dtype = getattr(torch, args.dtype)
    print(f"\nn_softmax over rows of L: ({args.q_heads}, W, L) {args.dtype}, n={args.n}")
    header = f"{'L':>6} {'triton ms':>10} {'torch ms':>9} {'torch/triton':>12} {'GB/s':>7}"
    print(header)
    print("-" * len(header))
    for seq in args.seqs:
        window = max(1, int(seq * args.window_ratio))
        x = torch.randn(args.q_heads, window, seq, device="cuda", dtype=dtype)
        ours, _ = _measure(lambda x=x: n_softmax_triton(x, args.n, -1))
        theirs, _ = _measure(lambda x=x: n_softmax_torch(x, args.n, -1))
        gbps = None if ours is None else 3 * x.numel() * x.element_size() / ours / 1e6
        ratio = None if ours is None or theirs is None else theirs / ours
        print(
            f"{seq:>6} {_fmt(ours, '10.3f')} {_fmt(theirs, '9.3f')} {_fmt(ratio, '12.2f')} "
            f"{_fmt(gbps, '7.1f')}"
        )
        del x


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[2048, 8192, 16384])
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16")
    parser.add_argument("--window-ratio", type=float, default=0.1)
    parser.add_argument("--n", type=float, default=1.0)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "bench_kernels_gpu.py needs a CUDA device (torch.cuda.is_available() is False); "
            "nothing was measured.",
            file=sys.stderr,
        )
        return 2
    import triton

    props = torch.cuda.get_device_properties(0)
    print(
        f"device: {props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} "
        f"GiB) | torch {torch.__version__} | triton {triton.__version__} | "
        f"python {platform.python_version()}"
    )
    bench_scores(args)
    bench_n_softmax(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
