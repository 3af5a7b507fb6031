"""A prompt's (or a conversation turn's) compaction into the cache: the bodies of the
``csp_inductor::window_prefill`` and ``csp_inductor::compact_`` ops (:mod:`csp_inductor.ops`).

The prefill attends to the prompt and, for a window scorer, computes the window's scores
with it (:func:`window_prefill`); the policy then selects the kept tokens of each KV head
and they are written, compacted, into the cache buffers (:func:`compact`). The policy is
given by its index in :mod:`csp_inductor.policy_table`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .attention import prefill_attention
from .labels import COMPACTION, SCORING, SELECTION, WINDOW_ATTENTION, label
from .policies import Policy
from .policy_table import policy_at
from .scoring import decomposed_scores_torch, window_attention_torch


def window_prefill(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    is_image: Tensor,
    key_padding: Tensor | None,
    policy: Tensor,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """The prompt's causal attention, (b, L, hq, d) as :func:`prefill_attention` returns it,
    and the window scores of ``policy`` (:func:`register_policy`), (b, hkv, 2, L) fp32,
    computed together: the scoring's logits of the last ``W`` queries give those rows'
    attention too, so the fast causal kernel runs on the other ``L - W`` rows only.

    For a policy that scores no window (or a batch it scores otherwise, see
    :meth:`Policy.scoring_window`) it is the plain prefill attention and the scores are zeros:
    :func:`compact` makes the same decision and does not read them."""
    b, hkv, seq, _ = key.shape
    if query.shape[2] != seq:
        raise ValueError(
            f"window_prefill needs a query for every key, got {query.shape[2]} queries for "
            f"{seq} keys"
        )
    chosen = policy_at(policy)
    window = chosen.scoring_window(seq, key_padding)
    if window is None:
        out = prefill_attention(
            query, key, value, scale=scale, key_padding=key_padding, sliding_window=None,
            kernel="sdpa",
        )  # fmt: skip
        return out, key.new_zeros((b, hkv, 2, seq), dtype=torch.float32)
    width = window.mask.shape[1]
    head = seq - width
    with label(WINDOW_ATTENTION):
        rows, scores = window_attention_torch(
            query[:, :, head:], key, value, is_image, chosen.window_n, scale, key_padding,
            window.mask.to(query.device),
        )  # fmt: skip
    out = query.new_empty((b, seq, query.shape[1], value.shape[-1]))
    out[:, head:] = rows.transpose(1, 2)
    if head:
        out[:, :head] = prefill_attention(
            query[:, :, :head], key[:, :, :head], value[:, :, :head], scale=scale,
            key_padding=None if key_padding is None else key_padding[:, :head],
            sliding_window=None, kernel="sdpa",
        )  # fmt: skip
    return out, scores


def compact(
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
    """Select the kept prompt tokens of one layer and write them, compacted, into the cache.

    - ``query`` (b, hq, L, d), ``key``/``value`` (b, hkv, L, d): the prompt's (or a turn's);
      ``is_image`` (b, L) bool its visual tokens, ``key_padding`` (b, L) bool its padding (None:
      none);
    - ``keys_out``/``values_out`` (b, hkv, capacity, d) and ``positions_out`` (b, hkv,
      capacity): the cache's buffers; the kept tokens go to their first K slots, with their
      absolute positions (-1 = unused);
    - ``lengths`` (b,): what the layer's cache was allocated for (the policy's count, or the
      layer's own: :meth:`Policy.layer_counts`); a different count is an error;
    - ``policy`` () long: the policy's index (:mod:`csp_inductor.policy_table`);
    - ``score_key`` (b, hkv, L, d'): the keys the policy scores ``query`` against when they are
      not the stored ones (an MLA layer stores its latent and scores with it joined to its
      rotary key);
    - ``lse`` (b, hq, L) fp32: the log-sum-exp of the prompt's causal attention rows, when the
      attention kernel returned it; a window scorer then does not recompute it;
    - ``start`` (b,) and ``offset`` () long: a conversation turn is written after the kept
      prefix, from slot ``start[b]`` on, at absolute positions ``offset + idx`` (``offset``:
      the tokens before the turn);
    - ``images_out`` (b, hkv, capacity) bool, a bounded or re-read cache's: the stored tokens'
      modality (False past them);
    - ``scores`` (b, hkv, L): what a policy that needs the layer's inputs ranks by
      (:attr:`Policy.needs_layer_inputs`), computed by the caller;
    - ``window_scores`` (b, hkv, 2, L) fp32: what :func:`window_prefill` computed for the same
      policy, read when the policy scores this prompt's window;
    - ``scores_out`` (b, hkv, 2, L) fp32: the window scores the policy ranked by are written
      here, for a layer whose count is known only after the prefill (``layers="adaptive"``,
      :mod:`csp_inductor.backend.adaptive`).
    """
    chosen = policy_at(policy)
    scored = key if score_key is None else score_key
    with label(SELECTION):  # scoring included
        if window_scores is not None and chosen.scoring_window(key.shape[2], key_padding) is None:
            window_scores = None  # zeros: the policy scores no window here
        if lse is not None:
            window_scores = _scores_from_lse(
                chosen, query, scored, is_image, key_padding, lse, scale
            )
        if scores_out is not None:
            if window_scores is None:
                window_scores = chosen.window_scores(query, scored, is_image, key_padding, scale)
            scores_out.copy_(window_scores)
        # a layer of its own count (Policy.layer_counts) is told it
        kept = None if chosen.layer_rule == "uniform" else lengths.tolist()
        idx = chosen.select(
            query, scored, is_image, key_padding, scale=scale, window_scores=window_scores,
            scores=scores, kept=kept,
        )  # fmt: skip
    counts = (idx >= 0).sum(dim=-1)
    if not torch.equal(counts, lengths[:, None].expand_as(counts)):
        raise RuntimeError(
            f"the policy kept {counts[:, 0].tolist()} tokens per row but the cache was allocated "
            f"for {lengths.tolist()}: Policy.budget_for disagrees with Policy.select"
        )
    with label(COMPACTION):
        _write_kept(
            idx, key, value, is_image, keys_out, values_out, positions_out, lengths, start,
            offset, images_out,
        )  # fmt: skip


def _write_kept(
    idx: Tensor,
    key: Tensor,
    value: Tensor,
    is_image: Tensor,
    keys_out: Tensor,
    values_out: Tensor,
    positions_out: Tensor,
    lengths: Tensor,
    start: Tensor | None,
    offset: Tensor | None,
    images_out: Tensor | None,
) -> None:
    """The tokens ``idx`` (b, hkv, K) selected (-1 = none) into the buffers, from slot 0 or,
    for a conversation turn, from slot ``start[b]`` on (see :func:`compact`)."""
    width = idx.shape[-1]
    valid = idx >= 0
    safe = idx.clamp_min(0)[..., None]
    kept_keys = key.gather(2, safe.expand(-1, -1, -1, key.shape[-1])) * valid[..., None]
    kept_values = value.gather(2, safe.expand(-1, -1, -1, value.shape[-1])) * valid[..., None]
    kept_images = is_image[:, None, :].expand(-1, idx.shape[1], -1)
    kept_images = kept_images.gather(2, safe[..., 0]) & valid
    if start is None:
        keys_out[:, :, :width] = kept_keys
        values_out[:, :, :width] = kept_values
        positions_out[:, :, :width] = idx
        if images_out is not None:
            images_out.zero_()
            images_out[:, :, :width] = kept_images
        return
    slots = (start[:, None, None] + torch.arange(width, device=idx.device)).expand_as(idx)
    keys_out.scatter_(2, slots[..., None].expand_as(kept_keys), kept_keys)
    values_out.scatter_(2, slots[..., None].expand_as(kept_values), kept_values)
    positions_out.scatter_(2, slots, torch.where(valid, idx + offset, -1))
    if images_out is not None:
        images_out.scatter_(2, slots, kept_images)
        clear_images_from(images_out, start + lengths)


def clear_images_from(images: Tensor, lengths: Tensor) -> None:
    """Slots from ``lengths[b]`` on hold no token: not visual (a re-prune reads them so)."""
    slots = torch.arange(images.shape[2], device=images.device)
    images.masked_fill_(slots >= lengths[:, None, None], False)


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
    with label(SCORING):
        if query.is_cuda:
            from .kernels.decomposed_scores import decomposed_scores_triton

            return decomposed_scores_triton(*args)
        return decomposed_scores_torch(*args)
