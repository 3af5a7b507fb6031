"""``torch.library`` registration of our ops, so compiled graphs trace through them.

Each op has a schema, a default (CPU) implementation in pure torch, a fake implementation for
tracing, and a CUDA implementation that dispatches to the Triton kernels. This module imports
neither Triton nor CUDA: the CUDA implementations import the kernels when first called.

- ``csp_inductor::decomposed_scores(q_window, k, is_image, n, scale, key_padding?, window_mask?)``
  -> (batch, kv_heads, 2, seq) fp32
- ``csp_inductor::n_softmax(x, n, dim)`` -> like ``x``
- ``csp_inductor::write_decode_``, ``remember_``, ``reprune_``: in-place cache writes (new
  tokens, a bounded cache's recent queries, its re-prune)
- ``csp_inductor::window_prefill(query, key, value, is_image, key_padding?, policy, scale)``
  -> the prompt's causal attention (b, L, hq, d) and a window scorer's scores (b, hkv, 2, L)
  fp32, its window rows computed once for both
- ``csp_inductor::compact_(query, key, value, is_image, key_padding?, keys_out!, values_out!,
  positions_out!, lengths, policy, scale, score_key?, lse?, start?, offset?, images_out!?,
  scores?, window_scores?)``: prefill (or a conversation turn's) selection + compaction into
  the cache buffers
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .attention import prefill_attention
from .labels import COMPACTION, REPRUNE, SCORING, SELECTION, WINDOW_ATTENTION, label
from .policies import Policy
from .policy_table import policy_at, register_policy  # noqa: F401  (compile.py imports it here)
from .scoring import decomposed_scores_torch, n_softmax_torch, window_attention_torch


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
@torch.library.custom_op("csp_inductor::window_prefill", mutates_args=())
def window_prefill_op(
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
    :func:`compact_op` makes the same decision and does not read them."""
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


@window_prefill_op.register_fake
def _(query, key, value, is_image, key_padding, policy, scale):
    b, hq, seq, _ = query.shape
    out = query.new_empty((b, seq, hq, value.shape[-1]))
    return out, key.new_empty((b, key.shape[1], 2, seq), dtype=torch.float32)


@torch.library.custom_op(
    "csp_inductor::compact_",
    mutates_args=("keys_out", "values_out", "positions_out", "images_out"),
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
    images_out: Tensor | None = None,
    scores: Tensor | None = None,
    window_scores: Tensor | None = None,
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
    ``offset + idx`` (``offset`` () long, the tokens before the turn). ``images_out``
    (b, hkv, capacity) bool, a bounded cache's: the stored tokens' modality (False past them).
    ``scores`` (b, hkv, L): what a policy that needs the layer's inputs ranks by
    (:attr:`Policy.needs_layer_inputs`), computed by the caller. ``window_scores``
    (b, hkv, 2, L) fp32: what :func:`window_prefill_op` computed for the same policy, read when
    the policy scores this prompt's window.
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
        idx = chosen.select(
            query, scored, is_image, key_padding, scale=scale, window_scores=window_scores,
            scores=scores,
        )  # fmt: skip
    width = idx.shape[-1]
    counts = (idx >= 0).sum(dim=-1)
    if not torch.equal(counts, lengths[:, None].expand_as(counts)):
        raise RuntimeError(
            f"the policy kept {counts[:, 0].tolist()} tokens per row but the cache was allocated "
            f"for {lengths.tolist()}: Policy.budget_for disagrees with Policy.select"
        )
    with label(COMPACTION):
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


# --- a bounded cache: recent queries and the re-prune ----------------------------------------
@torch.library.custom_op(
    "csp_inductor::remember_", mutates_args=("queries_out", "positions_out", "images_out")
)
def remember_op(
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


@remember_op.register_fake
def _(queries_out, positions_out, images_out, query, start, padding, is_image):
    return None


@torch.library.custom_op(
    "csp_inductor::reprune_", mutates_args=("keys", "values", "positions", "images")
)
def reprune_op(
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
) -> None:
    """Prune one layer's held tokens again, in place: the policy ranks the ``lengths[b]``
    stored tokens of row ``b`` as it ranks a prompt, with the remembered recent queries
    (``queries`` (b, hq, W, d) at ``ring_positions`` (b, W), -1 none; None for a policy that
    scores without queries) as its scoring window, or with ``scores`` (b, hkv, 2, capacity)
    per slot computed already (a re-reading's, :func:`reconstruct_scores_op`), and the
    ``kept[b]`` it keeps are compacted to the front, in order.

    Each KV head holds its own tokens, so the scores are computed here per head (the query
    sees the stored tokens at or before its position; split self/cross by the query's and the
    stored token's modality, as CSP splits window scores) and handed to the policy in a frame
    where each row's tokens end the sequence (left padding). The policy's own ``is_image``
    (CSP reads it only to tell whether a row holds images) is a slot's modality in any head."""
    chosen = policy_at(policy)
    b, heads, capacity, _ = keys.shape
    slots = torch.arange(capacity, device=keys.device)
    shift = capacity - lengths  # frame position j holds slot j - shift[b]
    order = (slots - shift[:, None]) % capacity  # (b, capacity)
    padding = slots[None, :] < shift[:, None]
    if scores is not None:
        scores = scores.gather(3, order[:, None, None, :].expand_as(scores))
    elif chosen.window_n is not None:
        # each row's window: its policy's window for the tokens it holds, the newest queries
        own = [chosen.budget_for(n).window for n in lengths.tolist()]
        newest = ring_positions.amax(dim=1, keepdim=True)
        oldest = newest - torch.tensor(own, device=keys.device)[:, None]
        ring_positions = ring_positions.masked_fill(ring_positions <= oldest, -1)
        scores = _held_scores(
            keys, positions, images, queries, ring_positions, ring_images, lengths,
            chosen.window_n, scale,
        )  # fmt: skip
        scores = scores.gather(3, order[:, None, None, :].expand_as(scores))
    frame_keys = keys.gather(2, order[:, None, :, None].expand_as(keys))
    frame_images = images.gather(2, order[:, None, :].expand_as(images)).any(dim=1)
    q_heads = heads if queries is None else queries.shape[1]
    unused = keys.new_zeros(()).expand(b, q_heads, capacity, keys.shape[3])  # no scorer reads it
    with label(REPRUNE):
        idx = chosen.select(
            unused, frame_keys, frame_images, padding, scale=scale, window_scores=scores
        )
    counts = (idx >= 0).sum(dim=-1)
    if not torch.equal(counts, kept[:, None].expand_as(counts)):
        raise RuntimeError(
            f"the policy kept {counts[:, 0].tolist()} held tokens per row, the backend expected "
            f"{kept.tolist()}"
        )
    chosen_slots = (idx - shift[:, None, None]).clamp_min(0)
    width = idx.shape[-1]
    for buffer in (keys, values):
        picked = buffer.gather(2, chosen_slots[..., None].expand(-1, -1, -1, buffer.shape[3]))
        buffer[:, :, :width] = picked
    positions[:, :, :width] = torch.where(idx >= 0, positions.gather(2, chosen_slots), -1)
    images[:, :, :width] = images.gather(2, chosen_slots) & (idx >= 0)
    clear_images_from(images, kept)


@reprune_op.register_fake
def _(keys, values, positions, images, queries, ring_positions, ring_images, lengths, *_):
    return None


@torch.library.custom_op("csp_inductor::reconstruct_scores_", mutates_args=("scores_out",))
def reconstruct_scores_op(
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


@reconstruct_scores_op.register_fake
def _(scores_out, query, keys, images, lengths, hidden, scored, is_image, *_):
    return None


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
