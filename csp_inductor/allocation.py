"""How a policy shares its budget among the layers (``layers=``): each rule's weights per
layer and the integer allocation of the score-ranked tokens by them.

- ``"pyramid"`` (PyramidKV): fixed weights, falling linearly from the first layer to the last;
- ``"adaptive"`` (after VL-Cache): each layer's weight is how spread its window's attention
  is, :func:`attention_density`, read from the window scores the policy ranks with.

Every layer keeps the policy's recent tokens; the layers' score-ranked tokens together are
what a uniform policy ranks in all of them, none holding more than twice the uniform count
(:data:`MAX_SHARE`).
"""

from __future__ import annotations

import torch
from torch import Tensor

# PyramidKV's beta: the last layer keeps 1/beta of the mean score-ranked tokens per layer
PYRAMID_BETA = 20.0
# no layer ranks more than this many times the uniform count (what an adaptive prefill keeps
# in every layer before the layers' counts are known)
MAX_SHARE = 2
# a layer's density: the share of its real keys that hold this much of its window's attention
DENSITY_MASS = 0.9


def allocate(total: int, weights: list[float], cap: int) -> list[int]:
    """``total`` tokens shared out among ``len(weights)`` parts in proportion to ``weights``
    (each ≥ 0, not all 0), none above ``cap``: a part whose share would pass the cap gets the
    cap and the rest is shared again among the others (equally, when they all weigh 0); the
    shares are then rounded by largest
    remainder (ties to the earlier part). The parts sum to ``min(total, cap · parts)``
    exactly."""
    if total < 0 or cap < 0 or not weights or min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(
            f"allocate needs total >= 0, cap >= 0 and weights >= 0 with a positive sum; got "
            f"total={total}, cap={cap}, weights={weights}"
        )
    parts = len(weights)
    out, free, left = [0] * parts, list(range(parts)), min(total, cap * parts)
    while True:
        weight = sum(weights[i] for i in free)
        # (parts of weight 0 share what the others could not hold equally)
        share = {i: left * (weights[i] / weight if weight else 1 / len(free)) for i in free}
        full = [i for i in free if share[i] >= cap]
        if not full:
            break
        for i in full:
            out[i], left = cap, left - cap
            free.remove(i)
    for i in free:
        out[i] = int(share[i])
    short = left - sum(out[i] for i in free)
    for i in sorted(free, key=lambda i: share[i] - out[i], reverse=True)[:short]:
        out[i] += 1
    return out


def pyramid_weights(layers: int, beta: float = PYRAMID_BETA) -> list[float]:
    """PyramidKV's shares of a budget over ``layers`` layers, first to last: linear, from
    ``2 - 1/beta`` times the mean in the first layer to ``1/beta`` times it in the last."""
    if layers == 1:
        return [1.0]
    top, bottom = 2 - 1 / beta, 1 / beta
    return [top - (top - bottom) * i / (layers - 1) for i in range(layers)]


def attention_density(scores: Tensor, key_padding: Tensor | None, mass: float = DENSITY_MASS):
    """(batch,) float: for each row, the fewest keys that hold ``mass`` of the attention of
    a layer's window queries, as a share of the row's real keys. ``scores`` (batch, kv_heads,
    2, seq): the decomposed window scores (their self and cross parts and the KV heads summed:
    each key's attention); ``key_padding`` (batch, seq) True = padding (None: none)."""
    attention = scores.float().sum(dim=(1, 2))  # (batch, seq)
    if key_padding is not None:
        attention = attention.masked_fill(key_padding, 0)
    ranked = attention.sort(dim=-1, descending=True).values.cumsum(dim=-1)
    total = ranked[:, -1:].clamp_min(torch.finfo(torch.float32).tiny)
    needed = (ranked < mass * total).sum(dim=-1) + 1
    real = scores.shape[-1] - (0 if key_padding is None else key_padding.sum(dim=-1))
    return needed.clamp(max=real) / real
