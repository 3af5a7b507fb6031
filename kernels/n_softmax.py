"""Fused row n-softmax: ``softmax_n(x)_j = exp(x_j) / (n + Σ_k exp(x_k))``.

Evaluated as ``exp(x_j - LSE) · sigmoid(LSE - ln n)`` (``LSE = logsumexp_k x_k``), which
overflows neither for large ``x`` nor for large ``n``; ``n = 0`` is the ordinary softmax. A row
that is entirely ``-inf`` gives zeros.

One program per row. Pass A streams the row in ``BLOCK`` columns keeping an online
per-lane max and rescaled sum (so any row length works in a fixed register budget); pass B
streams it again and writes ``exp(x - (LSE - ln w))``. Math in fp32 (fp64 stays fp64),
output in ``x``'s dtype.

Memory traffic: 2 reads + 1 write of ``x`` (``3·numel·e`` bytes; the second read is usually
L2-resident for rows up to a few MiB), against ~5 passes for the unfused torch expression.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

_MAX_BLOCK = 4096
BLOCKS = tuple(2**i for i in range(4, 13))  # the row blocks a launch can use: 16 .. _MAX_BLOCK
_MAX_ROWS = 2**31 - 1
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@triton.jit
def _n_softmax_kernel(
    x_ptr, out_ptr, n_cols, stride_x, stride_out, log_n,
    HAS_N: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    out_row = out_ptr + row * stride_out
    offs = tl.arange(0, BLOCK)
    neg_inf = float("-inf")

    m = tl.full([BLOCK], neg_inf, ACC)
    acc = tl.zeros([BLOCK], ACC)
    for start in range(0, n_cols, BLOCK):
        cols = start + offs
        x = tl.load(x_row + cols, mask=cols < n_cols, other=neg_inf).to(ACC)
        m_new = tl.maximum(m, x)
        # lanes that saw only -inf keep m = -inf: shift them by 0 so no inf - inf appears
        m_safe = tl.where(m_new == neg_inf, 0.0, m_new)
        acc = acc * tl.exp(m - m_safe) + tl.exp(x - m_safe)
        m = m_new
    row_max = tl.max(m, axis=0)
    max_safe = tl.where(row_max == neg_inf, 0.0, row_max)
    total = tl.sum(acc * tl.exp(m - max_safe), axis=0)
    # shift = LSE - ln w; an all -inf row gets +inf, so every output is exp(-inf) = 0
    shift = tl.where(
        total > 0.0, max_safe + tl.log(tl.where(total > 0.0, total, 1.0)), float("inf")
    )
    if HAS_N:
        # -ln w = softplus(ln n - LSE), evaluated without overflow
        t = log_n - shift
        shift = shift + tl.maximum(t, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(t)))

    for start in range(0, n_cols, BLOCK):
        cols = start + offs
        mask = cols < n_cols
        x = tl.load(x_row + cols, mask=mask, other=neg_inf).to(ACC)
        y = tl.exp(x - shift)
        tl.store(out_row + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def n_softmax_triton(x: Tensor, n: float, dim: int) -> Tensor:
    """``softmax_n(x)`` along ``dim``, the shape and dtype of ``x`` (any shape, any ``dim``).

    Same semantics as ``csp_inductor.scoring.n_softmax_torch``; ``n >= 0`` (0 = softmax).
    """
    if x.dtype not in _DTYPES:
        raise ValueError(f"x.dtype must be one of {_DTYPES}, got {x.dtype}")
    if not math.isfinite(n) or n < 0:
        raise ValueError(f"n must be a finite number >= 0, got n={n!r}")
    if x.dim() == 0:
        return n_softmax_triton(x.reshape(1), n, 0).reshape(())
    rows = x.movedim(dim, -1)
    n_cols = rows.shape[-1]
    flat = rows.reshape(-1, n_cols)  # a view when the rows are already contiguous
    if flat.numel() and flat.stride(-1) != 1:
        flat = flat.contiguous()
    out = torch.empty(flat.shape, dtype=x.dtype, device=x.device)
    n_rows = flat.shape[0]
    if n_rows > _MAX_ROWS:
        raise ValueError(f"{n_rows} rows exceed the launch limit {_MAX_ROWS}; split the input")
    if out.numel():
        acc = tl.float64 if x.dtype == torch.float64 else tl.float32
        block = min(_MAX_BLOCK, max(16, triton.next_power_of_2(n_cols)))
        _n_softmax_kernel[(n_rows,)](
            flat, out, n_cols, flat.stride(0), out.stride(0),
            math.log(n) if n > 0 else 0.0,
            HAS_N=n > 0, ACC=acc, BLOCK=block, num_warps=num_warps(block),
        )  # fmt: skip
    return out.view(rows.shape).movedim(-1, dim)


def num_warps(block: int) -> int:
    """Warps of a launch with row block ``block``."""
    return 8 if block >= 2048 else 4
