"""``torch.library`` registration of our ops, so compiled graphs trace through them.

Each op has a schema, a default (CPU) implementation in pure torch, a fake implementation for
tracing, and a CUDA implementation that dispatches to the Triton kernels. This module imports
neither Triton nor CUDA: the CUDA implementations import the kernels when first called.

- ``csp_inductor::decomposed_scores(q_window, k, is_image, n, scale, key_padding?, window_mask?)``
  -> (batch, kv_heads, 2, seq) fp32
- ``csp_inductor::n_softmax(x, n, dim)`` -> like ``x``
- ``csp_inductor::compact_(query, key, value, is_image, key_padding?, keys_out!, values_out!,
  positions_out!, lengths, policy, scale, score_key?, lse?, start?, offset?)``: prefill (or a
  conversation turn's) selection + compaction into the cache buffers
"""

from __future__ import annotations

import torch
from torch import Tensor

from .policies import Policy
from .profiling import label
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
# Policies are Python objects; the op refers to them by their index in a registry, passed as a
# 0-d tensor: a graph input, so switching policies does not recompile.
_POLICY_IDS: dict[Policy, int] = {}
_POLICIES: list[Policy] = []


def register_policy(policy: Policy) -> int:
    """A stable small int naming ``policy`` inside compiled graphs."""
    if policy not in _POLICY_IDS:
        _POLICY_IDS[policy] = len(_POLICIES)
        _POLICIES.append(policy)
    return _POLICY_IDS[policy]


@torch.library.custom_op(
    "csp_inductor::compact_", mutates_args=("keys_out", "values_out", "positions_out")
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
) -> None:
    """Select the kept prompt tokens of one layer and write them, compacted, into the cache.

    query (b, hq, L, d), key/value (b, hkv, L, d) -> keys_out/values_out[:, :, :K]
    (b, hkv, capacity, d) and positions_out[:, :, :K] (absolute positions, -1 = unused).
    ``lengths`` (b,) is what the cache was allocated for; a different count is an error.
    ``policy`` () long: the index of the policy (:func:`register_policy`). ``score_key``
    (b, hkv, L, d'): the keys the policy scores ``query`` against when they are not the stored
    ones (an MLA layer stores its latent and scores with it joined to its rotary key). ``lse``
    (b, hq, L) fp32: the log-sum-exp of the prompt's causal attention rows, when the attention
    kernel returned it; a window scorer then does not recompute it. A conversation turn is
    written after the kept prefix: from slot ``start[b]`` (b,) on, at absolute positions
    ``offset + idx`` (``offset`` () long, the tokens before the turn).
    """
    chosen = _POLICIES[int(policy)]
    scored = key if score_key is None else score_key
    with label("csp::selection"):  # scoring included
        window_scores = None
        if lse is not None:
            window_scores = _scores_from_lse(
                chosen, query, scored, is_image, key_padding, lse, scale
            )
        idx = chosen.select(
            query, scored, is_image, key_padding, scale=scale, window_scores=window_scores
        )
    width = idx.shape[-1]
    counts = (idx >= 0).sum(dim=-1)
    if not torch.equal(counts, lengths[:, None].expand_as(counts)):
        raise RuntimeError(
            f"the policy kept {counts[:, 0].tolist()} tokens per row but the cache was allocated "
            f"for {lengths.tolist()}: Policy.budget_for disagrees with Policy.select"
        )
    with label("csp::compaction"):
        valid = idx >= 0
        safe = idx.clamp_min(0)[..., None]
        kept_keys = key.gather(2, safe.expand(-1, -1, -1, key.shape[-1])) * valid[..., None]
        kept_values = value.gather(2, safe.expand(-1, -1, -1, value.shape[-1])) * valid[..., None]
        if start is None:
            keys_out[:, :, :width] = kept_keys
            values_out[:, :, :width] = kept_values
            positions_out[:, :, :width] = idx
            return
        slots = (start[:, None, None] + torch.arange(width, device=idx.device)).expand_as(idx)
        keys_out.scatter_(2, slots[..., None].expand_as(kept_keys), kept_keys)
        values_out.scatter_(2, slots[..., None].expand_as(kept_values), kept_values)
        positions_out.scatter_(2, slots, torch.where(valid, idx + offset, -1))


def _scores_from_lse(
    policy: Policy,
    query: Tensor,
    key: Tensor,
    is_image: Tensor,
    key_padding: Tensor | None,
    lse: Tensor,
    scale: float,
) -> Tensor | None:
    """A window scorer's scores from the attention's log-sum-exp (the Triton kernel on CUDA,
    the chunked torch path elsewhere); None for the other policies."""
    window = policy.scoring_window(key.shape[2], key_padding)
    if window is None:
        return None
    seq, width = key.shape[2], window.mask.shape[1]
    args = (
        query[:, :, seq - width :], key, is_image, policy.window_n, scale, key_padding,
        window.mask.to(query.device), lse[:, :, seq - width :], window.columns,
    )  # fmt: skip
    with label("csp::scoring"):
        if query.is_cuda:
            from .kernels.decomposed_scores import decomposed_scores_triton

            return decomposed_scores_triton(*args)
        return decomposed_scores_torch(*args)


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
    """A decode step's ``t`` new tokens into one layer's buffers, in place: K/V (b, h, t, d)
    at slots ``lengths[b] + [0, t)`` of keys_out/values_out (b, h, capacity, d), their
    absolute positions ``seen + [0, t)`` into positions_out (b, h, capacity).

    An op so that a compiled decode step writes in place: Inductor lowers a ``scatter_`` into
    a graph input as a copy of the whole buffer and a copy back (torch 2.13), which at a few
    thousand slots costs more than the step's attention."""
    b, h, t, _ = key_states.shape
    steps = torch.arange(t, device=key_states.device)
    slots = (lengths[:, None] + steps).view(b, 1, t).expand(b, h, t)
    for buffer, new in ((keys_out, key_states), (values_out, value_states)):
        buffer.scatter_(2, slots[..., None].expand(new.shape), new)
    positions_out.scatter_(2, slots, (seen + steps).expand(b, h, t))


@write_decode_op.register_fake
def _(keys_out, values_out, positions_out, key_states, value_states, lengths, seen):
    return None
