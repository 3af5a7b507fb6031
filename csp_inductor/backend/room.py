"""Room in the cache for new tokens, and the flex block masks of the forwards that attend to it.

An unbounded cache grows when new tokens do not fit; a full bounded one (``max_cache_tokens``)
is pruned again by the policy (:mod:`.bound`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..attention import decode_block_mask
from . import bound
from .step import Step

if TYPE_CHECKING:
    from ..cache import PrunedCache
    from .core import Backend


def make_room(backend: Backend, cache: PrunedCache, q_len: int) -> None:
    """Room for ``q_len`` new tokens: a full bounded cache is re-pruned (refused when even that
    leaves too little), an unbounded one grows."""
    if cache.room() >= q_len:
        return
    if cache.bound is None:
        cache.grow(max(q_len, backend.decode_capacity))
        backend.block_masks.clear()
        return
    after = max(backend.policy.budget_for(n).kept for n in cache.rows)
    if after + q_len > cache.bound:
        raise ValueError(
            f"max_cache_tokens={cache.bound}: {q_len} new tokens do not fit beside the "
            f"{after} tokens a re-prune of the {max(cache.rows)} held keeps; raise the "
            "bound or send fewer tokens at once"
        )
    bound.reprune(backend, cache)


def block_masks(backend: Backend, step: Step, q_len: int) -> dict:
    """The flex masks of a forward on the cache, by layer (None: the global layers' shared
    one): a decode step's of ``q_len`` new tokens (one token per step, or several, as assisted
    decoding verifies them), kept in ``backend.block_masks`` for the prompt's later steps of
    that size; or a turn's or re-read chunk's (its padding hidden), its own."""
    cache, layout = step.cache, step.layout
    masks = {}
    for layer in cache.pruned:
        window, chunk = layer.spec.sliding_window, layout.chunks[layer.index]
        own = window or chunk or cache.layer_rows is not None  # (layers of their own counts)
        key = layer.index if own else None
        if key in masks:
            continue
        if not step.as_turn and (q_len, key) in backend.block_masks:
            masks[key] = backend.block_masks[(q_len, key)]
            continue
        masks[key] = decode_block_mask(
            layer.lengths, layer.positions, cache.seen, window, layer.spec.q_heads, q_len,
            null_slot=cache.null_slot, chunk=chunk, starts=cache.starts,
            padding_slots=step.padding_slots_of(layer.index) if step.as_turn else None,
        )  # fmt: skip
        if not step.as_turn:
            backend.block_masks[(q_len, key)] = masks[key]
    return masks


def padding_slots(cache: PrunedCache, padding: torch.Tensor | None, width: int):
    """(batch, capacity) bool: which buffer slots the ``width`` new tokens' padding goes to
    (they are written at each row's length), by layer index (None: every layer's, where the
    layers keep the same count); None without padding."""
    if padding is None:
        return None
    layers = [None] if cache.layer_rows is None else [layer.index for layer in cache.pruned]
    out = {}
    for index in layers:
        layer = cache.pruned[0] if index is None else cache.layers[index]
        slots = layer.lengths[:, None] + torch.arange(width, device=padding.device)
        hidden = torch.zeros(
            padding.shape[0], layer.keys.shape[2], dtype=torch.bool, device=padding.device
        )
        out[index] = hidden.scatter_(1, slots, padding)
    return out
