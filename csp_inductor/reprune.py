"""A bounded cache's re-prune: the bodies of the ``csp_inductor::remember_`` and
``csp_inductor::reprune_`` ops (:mod:`csp_inductor.ops`).

A bounded cache remembers its last ``W`` tokens' queries in a ring (:func:`remember`) and,
when full, prunes the tokens it holds again (:func:`reprune`): the policy ranks them as it
ranks a prompt, scored against the remembered queries (:func:`_held_scores`) or by scores a
re-reading computed (:mod:`csp_inductor.reconstruction`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .compaction import clear_images_from
from .labels import REPRUNE, label
from .policy_table import policy_at
from .scoring import n_softmax_torch


def remember(
    queries_out: Tensor,
    positions_out: Tensor,
    images_out: Tensor,
    query: Tensor,
    start: Tensor,
    padding: Tensor | None,
    is_image: Tensor | None,
) -> None:
    """The queries of the last ``W`` tokens into a ring: query (b, hq, t, d) of the tokens at
    absolute positions ``start + [0, t)``; the last ``min(t, W)`` go to slots ``position % W``
    of queries_out (b, hq, W, d), with their positions (-1 for padding, ``padding`` (b, t)
    bool) and modality (``is_image`` (b, t) bool; None: text) into positions_out/images_out
    (b, W)."""
    window, t = queries_out.shape[2], query.shape[2]
    recent = min(t, window)
    steps = torch.arange(t - recent, t, device=query.device)
    slots = (start + steps) % window
    queries_out.index_copy_(2, slots, query[:, :, t - recent :].to(queries_out.dtype))
    positions = (start + steps).expand(query.shape[0], recent)
    if padding is not None:
        positions = positions.masked_fill(padding[:, t - recent :], -1)
    positions_out.index_copy_(1, slots, positions)
    images = torch.zeros_like(positions, dtype=torch.bool)
    if is_image is not None:
        images = is_image[:, t - recent :]
    images_out.index_copy_(1, slots, images)


def reprune(
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
    """Prune one layer's held tokens again, in place: the policy ranks the ``lengths[b]``
    stored tokens of row ``b`` as it ranks a prompt (after ``dropped[b]`` tokens pruned
    before, which it cannot keep: it keeps its budget of them all, a streamed prompt's), with
    the remembered recent queries (``queries`` (b, hq, W, d) at ``ring_positions`` (b, W), -1
    none; None for a policy that scores without queries) as its scoring window, or with
    ``scores`` (b, hkv, 2, capacity) per slot computed already (a re-reading's,
    :func:`~csp_inductor.reconstruction.reconstruct_scores`), and the ``kept[b]`` it keeps are
    compacted to the front, in order.

    Each KV head holds its own tokens, so the scores are computed here per head (the query
    sees the stored tokens at or before its position; split self/cross by the query's and the
    stored token's modality, as CSP splits window scores) and handed to the policy in a frame
    where each row's tokens end the sequence (left padding). The policy's own ``is_image``
    (CSP reads it only to tell whether a row holds images) is a slot's modality in any head."""
    chosen = policy_at(policy)
    b, heads, capacity, _ = keys.shape
    gone = torch.zeros_like(lengths) if dropped is None else dropped
    # frame: padding, then the dropped tokens, then the held ones
    extra = 0 if dropped is None else int(dropped.max())
    width = capacity + extra
    shift = width - (lengths + gone)  # frame position j holds slot j - shift[b] - gone[b]
    rel = torch.arange(width, device=keys.device) - shift[:, None]  # (b, width)
    order = torch.where(
        rel < gone[:, None], rel.clamp(0, max(extra - 1, 0)), extra + rel - gone[:, None]
    )
    padding = rel < 0
    if scores is None and chosen.window_n is not None:
        # each row's window: its policy's window for the tokens it holds, the newest queries
        own = [chosen.budget_for(n).window for n in lengths.tolist()]
        newest = ring_positions.amax(dim=1, keepdim=True)
        oldest = newest - torch.tensor(own, device=keys.device)[:, None]
        ring_positions = ring_positions.masked_fill(ring_positions <= oldest, -1)
        scores = _held_scores(
            keys, positions, images, queries, ring_positions, ring_images, lengths,
            chosen.window_n, scale,
        )  # fmt: skip
    if scores is not None:  # the dropped tokens' scores the lowest
        scores = _framed(scores, order, 3, extra, torch.finfo(scores.dtype).min)
    frame_keys = _framed(keys, order, 2, extra, 0)
    frame_images = _framed(images, order, 2, extra, False).any(dim=1)
    q_heads = heads if queries is None else queries.shape[1]
    unused = keys.new_zeros(()).expand(b, q_heads, width, keys.shape[3])  # no scorer reads it
    with label(REPRUNE):
        # (a layer of its own count, ``Policy.layer_counts``, is told it)
        own = None if chosen.layer_rule == "uniform" else kept.tolist()
        idx = chosen.select(
            unused, frame_keys, frame_images, padding, scale=scale, window_scores=scores,
            kept=own,
        )  # fmt: skip
    counts = (idx >= 0).sum(dim=-1)
    chosen_slots = idx - (shift + gone)[:, None, None]
    if not torch.equal(counts, kept[:, None].expand_as(counts)) or bool(
        ((chosen_slots < 0) & (idx >= 0)).any()
    ):
        raise RuntimeError(
            f"the policy kept {counts[:, 0].tolist()} held tokens per row, the backend expected "
            f"{kept.tolist()}"
        )
    _write_kept((keys, values, positions, images), idx, chosen_slots.clamp(0, capacity - 1))
    clear_images_from(images, kept)


def _framed(tensor: Tensor, order: Tensor, dim: int, extra: int, fill) -> Tensor:
    """``tensor`` (b, …) after ``extra`` entries of ``fill`` along ``dim`` (the dropped
    tokens'), gathered along ``dim`` by ``order`` (b, frame) into the frame."""
    if extra:
        front = list(tensor.shape)
        front[dim] = extra
        tensor = torch.cat([tensor.new_full(front, fill), tensor], dim=dim)
    shape = [order.shape[0]] + [1] * (tensor.dim() - 1)
    shape[dim] = order.shape[1]
    index = order.view(shape).expand(*tensor.shape[:dim], order.shape[1], *tensor.shape[dim + 1 :])
    return tensor.gather(dim, index)


def _write_kept(buffers, idx: Tensor, chosen_slots: Tensor) -> None:
    """The kept tokens (``idx`` >= 0, at ``chosen_slots``) of each row and head written in
    order to the front of ``buffers`` (keys, values, positions, images)."""
    keys, values, positions, images = buffers
    width = idx.shape[-1]
    for buffer in (keys, values):
        buffer[:, :, :width] = buffer.gather(
            2, chosen_slots[..., None].expand(-1, -1, -1, buffer.shape[3])
        )
    positions[:, :, :width] = torch.where(idx >= 0, positions.gather(2, chosen_slots), -1)
    images[:, :, :width] = images.gather(2, chosen_slots) & (idx >= 0)


def _held_scores(
    keys: Tensor,
    positions: Tensor,
    images: Tensor,
    queries: Tensor,
    ring_positions: Tensor,
    ring_images: Tensor,
    lengths: Tensor,
    n: float,
    scale: float,
    rows: int = 64,
) -> Tensor:
    """Decomposed scores (b, hkv, 2, capacity) of the held tokens from the remembered queries,
    ``rows`` queries at a time: query ``i`` of head group ``h`` sees slot ``s`` of KV head
    ``h`` when ``s < lengths[b]`` and the token there is not after it; the n-softmax rows are
    summed by whether query and key share a modality (self) or not (cross)."""
    b, heads, capacity, dim = keys.shape
    group = queries.shape[1] // heads
    held = torch.arange(capacity, device=keys.device) < lengths[:, None]  # (b, capacity)
    self_sum = torch.zeros(b, heads, capacity, dtype=torch.float32, device=keys.device)
    cross_sum = torch.zeros_like(self_sum)
    for lo in range(0, queries.shape[2], rows):
        q = queries[:, :, lo : lo + rows].float().view(b, heads, group, -1, dim)
        where = ring_positions[:, lo : lo + rows]  # (b, r)
        logits = torch.einsum("bhgrd,bhcd->bhgrc", q, keys.float()) * scale
        seen = positions[:, :, None, None, :] <= where[:, None, None, :, None]
        allowed = seen & held[:, None, None, None, :] & (where >= 0)[:, None, None, :, None]
        probs = n_softmax_torch(logits.masked_fill(~allowed, -math.inf), n, dim=-1)
        visual = ring_images[:, lo : lo + rows].float()[:, None, None, :, None]
        from_images = (probs * visual).sum(dim=(2, 3))
        from_text = (probs * (1 - visual)).sum(dim=(2, 3))
        self_sum += torch.where(images, from_images, from_text)
        cross_sum += torch.where(images, from_text, from_images)
    return torch.stack([self_sum, cross_sum], dim=2)
