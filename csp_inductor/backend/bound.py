"""The bounded cache (``max_cache_tokens``): a full cache pruned again by the policy."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..ops import reprune_op

if TYPE_CHECKING:
    from ..cache import PrunedCache
    from .core import Backend


def reprune(backend: Backend, cache: PrunedCache) -> None:
    """Prune a full bounded cache again with the policy, each row's held tokens ranked as a
    prompt of that length (one graph serves every re-prune)."""
    policy = backend.policy
    kept = [policy.budget_for(n).kept for n in cache.rows]
    if kept == cache.rows:
        raise ValueError(
            f"max_cache_tokens={cache.bound}: {policy!r} keeps all {cache.rows} tokens "
            "held, so no room can be made; raise the bound or lower the budget"
        )
    target = torch.tensor(kept, dtype=torch.long, device=cache.lengths.device)
    backend.reprune_layers(
        [layer.buffers() for layer in cache.pruned], cache.ring_positions, cache.ring_images,
        cache.lengths, target, backend.policy_index, backend.scales,
    )  # fmt: skip
    cache.lengths.copy_(target)
    cache.rows = kept
    cache.reprunes += 1


def reprune_layers(buffers, ring_positions, ring_images, lengths, kept, policy, scales):
    """Every layer's re-prune: ``buffers[i]`` a layer's (keys, values, positions, images,
    queries or nothing)."""
    for layer, scale in zip(buffers, scales, strict=True):
        keys, values, positions, images, *queries = layer
        reprune_op(
            keys, values, positions, images, queries[0] if queries else None, ring_positions,
            ring_images, lengths, kept, policy, scale,
        )  # fmt: skip
