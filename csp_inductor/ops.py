"""``torch.library`` registration of our ops, so compiled graphs trace through them.

Each op has a schema, a default (CPU) implementation in pure torch, a fake implementation for
tracing, and a CUDA implementation that dispatches to the Triton kernels. This module imports
neither Triton nor CUDA: the CUDA implementations import the kernels when first called. It
holds the registrations only; each default implementation is one call into the module that
computes it (:mod:`~csp_inductor.scoring`, :mod:`~csp_inductor.compaction`,
:mod:`~csp_inductor.decode_write`, :mod:`~csp_inductor.reprune`,
:mod:`~csp_inductor.reconstruction`). A ``policy`` argument is a policy's index in
:mod:`~csp_inductor.policy_table`.

- ``csp_inductor::decomposed_scores(q_window, k, is_image, n, scale, key_padding?, window_mask?)``
  -> (batch, kv_heads, 2, seq) fp32
- ``csp_inductor::n_softmax(x, n, dim)`` -> like ``x``
- ``csp_inductor::write_decode_``, ``remember_``, ``reprune_``: in-place cache writes (new
  tokens, a bounded cache's recent queries, its re-prune)
- ``csp_inductor::window_prefill(query, key, value, is_image, key_padding?, policy, scale)``
  -> the prompt's causal attention (b, L, hq, d) and a window scorer's scores (b, hkv, 2, L)
  fp32, its window rows computed once for both
- ``csp_inductor::compact_(query, key, value, is_image, key_padding?, keys_out!, values_out!,
  positions_out!, lengths, policy, scale, score_key?, lse?, start?, offset?,
  images_out!?, scores?, window_scores?, scores_out!?)``: prefill (or a conversation turn's)
  selection + compaction into the cache buffers
- ``csp_inductor::reconstruct_scores_``: a re-read chunk's attention folded into the held
  tokens' scores, in place
"""

from __future__ import annotations

import torch
from torch import Tensor

from .compaction import compact, window_prefill
from .decode_write import write_decode
from .reconstruction import reconstruct_scores
from .reprune import remember, reprune
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


# --- prefill compaction ----------------------------------------------------------------------
@torch.library.custom_op("csp_inductor::window_prefill", mutates_args=())
def window_prefill_op(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    is_image: Tensor,
    key_padding: Tensor | None,
    policy: Tensor,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """The prompt's attention and the window scores together: :func:`.compaction.window_prefill`."""
    return window_prefill(query, key, value, is_image, key_padding, policy, scale)


@window_prefill_op.register_fake
def _(query, key, value, is_image, key_padding, policy, scale):
    b, hq, seq, _ = query.shape
    out = query.new_empty((b, seq, hq, value.shape[-1]))
    return out, key.new_empty((b, key.shape[1], 2, seq), dtype=torch.float32)


@torch.library.custom_op(
    "csp_inductor::compact_",
    mutates_args=("keys_out", "values_out", "positions_out", "images_out", "scores_out"),
)
def compact_op(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    is_image: Tensor,
    key_padding: Tensor | None,
    keys_out: Tensor,
    values_out: Tensor,
    positions_out: Tensor,
    lengths: Tensor,
    policy: Tensor,
    scale: float,
    score_key: Tensor | None = None,
    lse: Tensor | None = None,
    start: Tensor | None = None,
    offset: Tensor | None = None,
    images_out: Tensor | None = None,
    scores: Tensor | None = None,
    window_scores: Tensor | None = None,
    scores_out: Tensor | None = None,
) -> None:
    """One layer's kept prompt tokens into the cache: :func:`.compaction.compact`."""
    compact(
        query, key, value, is_image, key_padding, keys_out, values_out, positions_out, lengths,
        policy, scale, score_key, lse, start, offset, images_out, scores, window_scores,
        scores_out,
    )  # fmt: skip


@compact_op.register_fake
def _(query, key, value, is_image, key_padding, keys_out, values_out, positions_out, lengths, *_):
    return None


# --- decode writes ---------------------------------------------------------------------------
@torch.library.custom_op(
    "csp_inductor::write_decode_", mutates_args=("keys_out", "values_out", "positions_out")
)
def write_decode_op(
    keys_out: Tensor,
    values_out: Tensor,
    positions_out: Tensor,
    key_states: Tensor,
    value_states: Tensor,
    lengths: Tensor,
    seen: Tensor,
) -> None:
    """A decode step's new tokens into one layer's buffers: :func:`.decode_write.write_decode`.

    An op so that a compiled decode step writes in place: Inductor lowers a ``scatter_`` into
    a graph input as a copy of the whole buffer and a copy back (torch 2.13), which at a few
    thousand slots costs more than the step's attention."""
    write_decode(keys_out, values_out, positions_out, key_states, value_states, lengths, seen)


@write_decode_op.register_fake
def _(keys_out, values_out, positions_out, key_states, value_states, lengths, seen):
    return None


# --- a bounded cache: recent queries and the re-prune ----------------------------------------
@torch.library.custom_op(
    "csp_inductor::remember_", mutates_args=("queries_out", "positions_out", "images_out")
)
def remember_op(
    queries_out: Tensor,
    positions_out: Tensor,
    images_out: Tensor,
    query: Tensor,
    start: Tensor,
    padding: Tensor | None,
    is_image: Tensor | None,
) -> None:
    """The last ``W`` tokens' queries into a ring: :func:`.reprune.remember`."""
    remember(queries_out, positions_out, images_out, query, start, padding, is_image)


@remember_op.register_fake
def _(queries_out, positions_out, images_out, query, start, padding, is_image):
    return None


@torch.library.custom_op(
    "csp_inductor::reprune_", mutates_args=("keys", "values", "positions", "images")
)
def reprune_op(
    keys: Tensor,
    values: Tensor,
    positions: Tensor,
    images: Tensor,
    queries: Tensor | None,
    ring_positions: Tensor | None,
    ring_images: Tensor | None,
    lengths: Tensor,
    kept: Tensor,
    policy: Tensor,
    scale: float,
    scores: Tensor | None = None,
    dropped: Tensor | None = None,
) -> None:
    """One layer's held tokens pruned again, in place: :func:`.reprune.reprune`."""
    reprune(
        keys, values, positions, images, queries, ring_positions, ring_images, lengths, kept,
        policy, scale, scores, dropped,
    )  # fmt: skip


@reprune_op.register_fake
def _(keys, values, positions, images, queries, ring_positions, ring_images, lengths, *_):
    return None


@torch.library.custom_op("csp_inductor::reconstruct_scores_", mutates_args=("scores_out",))
def reconstruct_scores_op(
    scores_out: Tensor,
    query: Tensor,
    keys: Tensor,
    images: Tensor,
    lengths: Tensor,
    hidden: Tensor | None,
    scored: Tensor,
    is_image: Tensor,
    n: float,
    scale: float,
    reduce_max: bool,
    rows: int = 64,
) -> None:
    """A re-read chunk's attention folded into the held tokens' scores, in place:
    :func:`.reconstruction.reconstruct_scores`."""
    reconstruct_scores(
        scores_out, query, keys, images, lengths, hidden, scored, is_image, n, scale, reduce_max,
        rows,
    )  # fmt: skip


@reconstruct_scores_op.register_fake
def _(scores_out, query, keys, images, lengths, hidden, scored, is_image, *_):
    return None
