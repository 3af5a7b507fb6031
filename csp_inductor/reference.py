"""The executable specification: dense, readable, slow. Every fast path is tested against it.

Nothing here is optimised. Scores are computed from full dense logits (in the input dtype
promoted to at least fp32; pass fp64 tensors for an exact oracle), and selection loops over
sequences and heads in Python, ranking with an explicit ``(-score, position)`` key so ties go
to the lower position. The formulas are those of CSP_SPEC.md.

Shapes: ``q`` (batch, q_heads, seq, head_dim), ``k`` (batch, kv_heads, seq, head_dim),
``is_image`` and ``key_padding`` (batch, seq) bool (``key_padding`` True = left padding).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .budget import Budget


def n_softmax(x: Tensor, n: float = 1.0, dim: int = -1) -> Tensor:
    """``exp(x) / (n + Σ exp(x))`` along ``dim``, shifted by the row maximum for range."""
    shift = x.amax(dim=dim, keepdim=True).clamp_min(torch.finfo(x.dtype).min)
    num = torch.exp(x - shift)
    return num / (n * torch.exp(-shift) + num.sum(dim=dim, keepdim=True))


def _float(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float64 else x.float()


def window_logits(
    q_window: Tensor, k: Tensor, scale: float | None = None, key_padding: Tensor | None = None
) -> Tensor:
    """Dense logits of the last ``W`` prompt queries: (batch, q_heads, W, seq), -inf where masked.

    Query ``i`` sits at position ``seq - W + i`` and sees keys ``j <= seq - W + i`` that are not
    padding. Key heads are repeated for grouped-query attention.
    """
    _, hq, w, d = q_window.shape
    seq = k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    keys = _float(k).repeat_interleave(hq // k.shape[1], dim=1)
    logits = _float(q_window) @ keys.transpose(-1, -2) * scale
    pos_q = torch.arange(seq - w, seq, device=k.device)[:, None]
    allowed = torch.arange(seq, device=k.device)[None, :] <= pos_q
    allowed = allowed[None, None]
    if key_padding is not None:
        allowed = allowed & ~key_padding[:, None, None, :]
    return logits.masked_fill(~allowed, -math.inf)


def decomposed_scores(
    q_window: Tensor,
    k: Tensor,
    is_image: Tensor,
    *,
    n: float = 1.0,
    scale: float | None = None,
    key_padding: Tensor | None = None,
    window_mask: Tensor | None = None,
) -> Tensor:
    """CSP's self/cross scores, (batch, kv_heads, 2, seq): ``[:, :, 0]`` self, ``[:, :, 1]`` cross.

    ``window_mask`` (batch, W) bool marks the window queries that count (None = all); queries
    at padding positions never count.
    """
    b, hq, w, _ = q_window.shape
    hkv, seq = k.shape[1], k.shape[2]
    probs = n_softmax(window_logits(q_window, k, scale, key_padding), n=n)
    valid = torch.ones(b, w, dtype=torch.bool, device=k.device)
    if window_mask is not None:
        valid = valid & window_mask
    if key_padding is not None:
        valid = valid & ~key_padding[:, seq - w :]
    probs = probs.nan_to_num(0.0) * valid[:, None, :, None]
    q_img = is_image[:, seq - w :].to(probs.dtype)[:, None, :, None]
    c_img = (probs * q_img).sum(dim=2)  # (batch, q_heads, seq)
    c_txt = (probs * (1 - q_img)).sum(dim=2)
    c_img = c_img.view(b, hkv, hq // hkv, seq).sum(dim=2)
    c_txt = c_txt.view(b, hkv, hq // hkv, seq).sum(dim=2)
    k_img = is_image[:, None, :]
    s_self = torch.where(k_img, c_img, c_txt)
    s_cross = torch.where(k_img, c_txt, c_img)
    return torch.stack([s_self, s_cross], dim=2)


def column_softmax_sums(
    q: Tensor, k: Tensor, *, scale: float | None = None, key_padding: Tensor | None = None
) -> Tensor:
    """Σ over the given queries of softmax attention to key ``j``: (batch, kv_heads, seq).

    ``q`` holds the last ``W`` queries (``W = seq`` for all of them, as H2O uses).
    """
    b, hq, w, _ = q.shape
    hkv, seq = k.shape[1], k.shape[2]
    probs = torch.softmax(window_logits(q, k, scale, key_padding), dim=-1).nan_to_num(0.0)
    if key_padding is not None:
        probs = probs * ~key_padding[:, None, seq - w :, None]
    return probs.sum(dim=2).view(b, hkv, hq // hkv, seq).sum(dim=2)


def snapkv_pool(scores: Tensor, window: int, kernel_size: int = 5) -> Tensor:
    """SnapKV's smoothing: zero-padded average pool of width ``kernel_size`` over the keys
    ``[0, seq - window)``; the window's own scores are left as they are."""
    prefix = scores[..., : scores.shape[-1] - window]
    flat = prefix.reshape(-1, 1, prefix.shape[-1])
    pooled = torch.nn.functional.avg_pool1d(
        flat, kernel_size, stride=1, padding=kernel_size // 2, count_include_pad=True
    )
    out = scores.clone()
    out[..., : prefix.shape[-1]] = pooled.view(prefix.shape)
    return out


def top_positions(score: Sequence[float], candidates: Sequence[int], count: int) -> list[int]:
    """The ``count`` candidates with the highest score; equal scores: lower position first."""
    return sorted(candidates, key=lambda j: (-score[j], j))[:count]


def csp_keep(
    s_self: Sequence[float],
    s_cross: Sequence[float],
    budget: Budget,
    pad: int,
    *,
    sink_tokens: int = 0,
    faithful: bool = False,
) -> list[int]:
    """Kept positions (ascending; duplicates only in ``faithful`` mode) of one sequence and head.

    ``pad`` left-padding positions precede the ``budget.length`` real tokens.
    """
    seq = pad + budget.length
    if budget.keep_all:
        return list(range(pad, seq))
    recent = list(range(seq - budget.recent, seq))
    pool = range(pad, seq - budget.recent)
    if faithful:
        chosen_self = top_positions(s_self, pool, budget.k_self)
        chosen_cross = top_positions(s_cross, pool, budget.k_cross)
        return sorted(chosen_self + chosen_cross + recent)
    sinks = list(pool[: min(sink_tokens, budget.k_self)])
    rest = [j for j in pool if j not in sinks]
    chosen_self = sinks + top_positions(s_self, rest, budget.k_self - len(sinks))
    rest = [j for j in rest if j not in chosen_self]
    chosen_cross = top_positions(s_cross, rest, budget.k_cross)
    return sorted(chosen_self + chosen_cross + recent)


def ranked_keep(
    score: Sequence[float],
    budget: Budget,
    pad: int,
    *,
    first: Sequence[bool] | None = None,
) -> list[int]:
    """Baselines: the top ``budget.k`` positions of ``[pad, seq - recent)`` by score, plus the
    recent window. ``first`` (per position) ranks every flagged position before any other, as
    LOOK-M's text prior does."""
    seq = pad + budget.length
    if budget.keep_all:
        return list(range(pad, seq))
    pool = range(pad, seq - budget.recent)
    if first is None:
        chosen = top_positions(score, pool, budget.k)
    else:
        chosen = sorted(pool, key=lambda j: (not first[j], -score[j], j))[: budget.k]
    return sorted(chosen + list(range(seq - budget.recent, seq)))


def pad_rows(rows: Sequence[Sequence[Sequence[int]]]) -> Tensor:
    """Nested lists ``[batch][kv_head][kept]`` to a LongTensor padded with -1 at the end."""
    width = max(len(r) for per_b in rows for r in per_b)
    out = torch.full((len(rows), len(rows[0]), width), -1, dtype=torch.long)
    for b, per_b in enumerate(rows):
        for h, r in enumerate(per_b):
            out[b, h, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out
