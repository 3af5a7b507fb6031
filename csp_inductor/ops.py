"""``torch.library`` registration of our ops, so compiled graphs trace through them.

Each op has a schema, a default (CPU) implementation in pure torch, a fake implementation for
tracing, and a CUDA implementation that dispatches to the Triton kernels. This module imports
neither Triton nor CUDA: the CUDA implementations import the kernels when first called.

- ``csp_inductor::decomposed_scores(q_window, k, is_image, n, scale, key_padding?, window_mask?)``
  -> (batch, kv_heads, 2, seq) fp32
- ``csp_inductor::n_softmax(x, n, dim)`` -> like ``x``
"""

from __future__ import annotations

import torch
from torch import Tensor

from .scoring import decomposed_scores_torch, n_softmax_torch


@torch.library.custom_op("csp_inductor::decomposed_scores", mutates_args=())
def decomposed_scores_op(
    q_window: Tensor,
    k: Tensor,
    is_image: Tensor,
    n: float,
    scale: float,
    key_padding: Tensor | None,
    window_mask: Tensor | None,
) -> Tensor:
    return decomposed_scores_torch(q_window, k, is_image, n, scale, key_padding, window_mask)


@decomposed_scores_op.register_fake
def _(q_window, k, is_image, n, scale, key_padding, window_mask):
    b, hkv, seq, _ = k.shape
    return k.new_empty((b, hkv, 2, seq), dtype=torch.float32)


@decomposed_scores_op.register_kernel("cuda")
def _(q_window, k, is_image, n, scale, key_padding, window_mask):
    from .kernels.decomposed_scores import decomposed_scores_triton

    return decomposed_scores_triton(q_window, k, is_image, n, scale, key_padding, window_mask)


@torch.library.custom_op("csp_inductor::n_softmax", mutates_args=())
def n_softmax_op(x: Tensor, n: float, dim: int) -> Tensor:
    return n_softmax_torch(x, n, dim)


@n_softmax_op.register_fake
def _(x, n, dim):
    return torch.empty_like(x)


@n_softmax_op.register_kernel("cuda")
def _(x, n, dim):
    from .kernels.n_softmax import n_softmax_triton

    return n_softmax_triton(x, n, dim)
