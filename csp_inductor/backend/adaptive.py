"""A prompt whose policy shares its budget by the layers' attention (``layers="adaptive"``).

Each layer's count depends on every layer's density, known only once the forward is done. So
at the prefill every layer keeps the most any layer can keep (:meth:`Policy.prefill_count`)
and its compaction writes the window scores it ranked by (``Step.layer_scores``); then
:func:`trim` reads each layer's density from them
(:func:`~csp_inductor.allocation.attention_density`), shares the budget out
(:meth:`Policy.layer_counts`), and trims each layer in place to its count, its buffers given
back down to that count and the decode room.

A trimmed layer holds exactly what a prefill at its count would have kept: the policy selects
again from the same scores at that count, and a selection at a smaller count is a subset of
the one at a larger count (top-k sets are nested; CSP's cross quota, taken from what its self
quota left, included), which the trim checks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..allocation import attention_density

if TYPE_CHECKING:
    from ..cache import PrunedCache
    from .core import Backend
    from .step import Step


def score_buffers(cache: PrunedCache, batch: int, length: int) -> dict:
    """Where each stored layer's compaction writes its window scores: (batch, kv_heads, 2,
    length) fp32 by layer index."""
    return {
        layer.index: torch.zeros(
            batch, layer.keys.shape[1], 2, length, dtype=torch.float32, device=layer.keys.device
        )
        for layer in cache.pruned
    }


def trim(backend: Backend, step: Step) -> None:
    """After an adaptive policy's prefill: each layer's count from the layers' densities, and
    each layer trimmed to it."""
    cache, policy, padding = step.cache, backend.policy, step.padding
    batch, seq = step.is_image.shape
    pads = [0] * batch if padding is None else padding.sum(dim=1).tolist()
    layers = cache.pruned
    scores = [step.layer_scores[layer.index] for layer in layers]
    counts = layer_counts(policy, [seq - pad for pad in pads], len(layers), scores, padding)
    for layer, kept in zip(layers, counts, strict=True):
        scores = step.layer_scores.pop(layer.index)
        unused = scores.new_zeros(()).expand(batch, scores.shape[1], seq, 1)  # no scorer reads it
        idx = policy.select(unused, unused, step.is_image, padding, window_scores=scores, kept=kept)
        _keep(layer, idx)
    cache.finish_prompt(layer_kept=counts)


def layer_counts(
    policy, lengths: list[int], layers: int, scores: list[torch.Tensor], padding
) -> list[list[int]]:
    """Each of ``layers`` layers' kept count of each row of ``lengths[b]`` real tokens
    (``counts[j][b]``), by the policy's rule; ``"adaptive"`` reads the densities of the layers'
    ``scores`` (b, hkv, 2, slots), ``padding`` (b, slots) True where a slot holds no token."""
    density = None
    if policy.layer_rule == "adaptive":
        density = torch.stack([attention_density(s, padding) for s in scores]).tolist()
    by_row = [
        policy.layer_counts(n, layers, None if density is None else [d[b] for d in density])
        for b, n in enumerate(lengths)
    ]
    return [list(kept) for kept in zip(*by_row, strict=True)]


def _keep(layer, idx: torch.Tensor) -> None:  # (the slots after them cleared by the cache)
    """Move the held tokens at prompt positions ``idx`` (b, hkv, K), ascending, -1 past each
    row's count, to the front of the layer's buffers, in order."""
    held = layer.positions.masked_fill(layer.positions < 0, torch.iinfo(torch.long).max)
    valid = idx >= 0
    slots = torch.searchsorted(held.contiguous(), idx.clamp_min(0).contiguous())
    slots = slots.clamp_max(held.shape[2] - 1)
    if not torch.equal(held.gather(2, slots)[valid], idx[valid]):
        raise RuntimeError(
            "an adaptive layer's trim selected a token its prefill did not keep: the policy's "
            "selection at a smaller count is not a subset of its selection at a larger one"
        )
    width = idx.shape[-1]
    for buffer in (layer.keys, layer.values):
        kept = buffer.gather(2, slots[..., None].expand(-1, -1, -1, buffer.shape[3]))
        buffer[:, :, :width] = kept * valid[..., None]
    layer.positions[:, :, :width] = idx
