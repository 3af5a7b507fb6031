"""Batched selection: per-sequence quotas and scores -> kept positions per KV head.

Index lists are (batch, heads, count) LongTensors whose unused tail entries are ``-1``; a
sequence's quotas are Python ints (selection runs once per layer at prefill, where the
per-sequence budget arithmetic is host-side anyway). Ranking uses a stable descending sort
over masked scores, so equal scores go to the lower position, as the reference does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def counts(values: Sequence[int], device: torch.device) -> Tensor:
    """Per-sequence counts as a (batch, 1, 1) LongTensor, to broadcast against index lists."""
    return torch.tensor(list(values), dtype=torch.long, device=device).view(-1, 1, 1)


def top(scores: Tensor, quota: Tensor, candidates: Tensor) -> Tensor:
    """The ``quota[b]`` highest-scoring candidate positions of each row.

    Args:
        scores: (batch, heads, seq) float.
        quota: (batch, 1, 1) long, never more than the candidates of the row.
        candidates: (batch, 1 or heads, seq) bool.
    Returns:
        (batch, heads, max quota) long, best first, ``-1`` past each row's quota.
    """
    width = int(quota.max())
    masked = scores.float().masked_fill(~candidates, -math.inf)
    order = torch.sort(masked, dim=-1, descending=True, stable=True).indices[..., :width]
    return order.masked_fill(torch.arange(width, device=scores.device) >= quota, -1)


def span(start: Tensor, length: Tensor, heads: int) -> Tensor:
    """Positions ``[start[b], start[b] + length[b])``: (batch, heads, max length), -1 padded."""
    width = int(length.max())
    offsets = torch.arange(width, device=start.device)
    idx = (start + offsets).masked_fill(offsets >= length, -1)
    return idx.expand(-1, heads, -1)


def as_mask(idx: Tensor, seq: int) -> Tensor:
    """Index lists (-1 = unused) to a (batch, heads, seq) bool mask."""
    mask = torch.zeros(*idx.shape[:-1], seq + 1, dtype=torch.bool, device=idx.device)
    mask.scatter_(-1, idx.masked_fill(idx < 0, seq), True)
    return mask[..., :seq]


def merge(parts: Sequence[Tensor], seq: int) -> Tensor:
    """Concatenate index lists, sort ascending, move the ``-1`` to the end, trim the width.

    Duplicates are kept (the authors' quirk, reproduced in faithful mode); callers that want
    distinct tokens select from disjoint candidate sets.
    """
    heads = max(p.shape[1] for p in parts)
    idx = torch.cat([p.expand(-1, heads, -1) for p in parts], dim=-1)
    idx = idx.masked_fill(idx < 0, seq).sort(dim=-1).values
    width = int((idx < seq).sum(dim=-1).max())
    idx = idx[..., :width]
    return idx.masked_fill(idx == seq, -1)
