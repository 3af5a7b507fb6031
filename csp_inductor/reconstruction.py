"""Question-agnostic scores of the held tokens from a re-reading of the prompt: the body of the
``csp_inductor::reconstruct_scores_`` op (:mod:`csp_inductor.ops`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def reconstruct_scores(
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
    """Fold one re-read chunk's attention into the held tokens' scores, in place.

    query (b, hq, t, d): the chunk's queries, its tokens written at slots ``lengths[b] +
    [0, t)`` of keys (b, hkv, capacity, d); query ``i`` sees every held slot
    (``< lengths[b]``) and the chunk's slots up to its own, except ``hidden`` (b, capacity)
    ones (padding). The n-softmax over what it sees gives each held slot a probability; the
    ``scored`` (b, t) queries' probabilities are reduced over queries and the query heads of
    each KV head (max, or sum), separately by whether query (``is_image`` (b, t)) and held
    token (``images`` (b, hkv, capacity)) share a modality, and folded into ``scores_out``
    (b, hkv, 2, capacity) fp32 [self, cross] the same way (max, or add). ``rows`` queries at
    a time: no (t, capacity) tensor per head group is larger than ``rows × capacity``."""
    b, heads, capacity, dim = keys.shape
    t, group = query.shape[2], query.shape[1] // heads
    width = int(lengths.max())  # the held slots of the longest row; the chunk's follow each row's
    held_keys = keys[:, :, :width].float()
    steps = torch.arange(t, device=keys.device)
    chunk_slots = (lengths[:, None] + steps).clamp_max(capacity - 1)  # (b, t)
    chunk_keys = keys.gather(2, chunk_slots[:, None, :, None].expand(-1, heads, -1, dim)).float()
    seen_chunk = steps[None, :] <= steps[:, None]  # (query step, chunk step): causal
    if hidden is not None:
        seen_chunk = seen_chunk & ~hidden.gather(1, chunk_slots)[:, None, :]
    short = bool((lengths < width).any())  # rows holding fewer: their tail slots are not seen
    held = torch.arange(width, device=keys.device) < lengths[:, None]  # (b, width)
    fold = torch.maximum if reduce_max else torch.add
    by_image = torch.zeros_like(scores_out[:, :, 0, :width])
    by_text = torch.zeros_like(by_image)
    for lo in range(0, t, rows):
        hi = min(t, lo + rows)
        q = query[:, :, lo:hi].float().view(b, heads, group, hi - lo, dim) * scale
        on_held = torch.einsum("bhgrd,bhcd->bhgrc", q, held_keys)
        if short:
            on_held.masked_fill_(~held[:, None, None, None, :], -math.inf)
        on_chunk = torch.einsum("bhgrd,bhcd->bhgrc", q, chunk_keys)
        on_chunk.masked_fill_(~seen_chunk[:, lo:hi][:, None, None], -math.inf)
        top = torch.maximum(on_held.amax(dim=-1), on_chunk.amax(dim=-1))  # (b, h, g, r)
        # n-softmax exp(x) / (n + Σ exp(x)), shifted by each row's top logit
        total = on_held.sub_(top[..., None]).exp_().sum(dim=-1)
        total += (on_chunk - top[..., None]).exp().sum(dim=-1) + n * torch.exp(-top)
        inverse = total.reciprocal()
        counted = scored[:, lo:hi]
        for modality, out in ((is_image[:, lo:hi], by_image), (~is_image[:, lo:hi], by_text)):
            weight = inverse * (counted & modality)[:, None, None, :].float()  # (b, h, g, r)
            if reduce_max:
                chunk_best = (on_held * weight[..., None]).amax(dim=(2, 3))
            else:
                chunk_best = torch.einsum("bhgrc,bhgr->bhc", on_held, weight)
            out.copy_(fold(out, chunk_best))
    images = images[:, :, :width]
    chunk_scores = torch.stack(
        [torch.where(images, by_image, by_text), torch.where(images, by_text, by_image)], dim=2
    )
    scores_out[..., :width] = fold(
        scores_out[..., :width], chunk_scores.masked_fill(~held[:, None, None], 0)
    )
