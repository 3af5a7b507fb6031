"""Prefill and decode attention over the pruned cache, with FlexAttention or SDPA.

Masks are small factories that capture tensors (never Python ints that change per step), so a
compiled graph reads them as inputs and is not rebuilt when they change in place:

- prefill: (causal ∧ sliding window ∧ same chunk, or the model's own mask when it has one) ∧
  (key is not padding ∨ query is padding). Padding queries attend to padding keys so their
  (discarded) rows stay finite instead of NaN.
- decode: slot ``s`` of row ``b`` is valid for new query ``i`` when ``s < lengths[b] + i + 1``
  (kept prompt tokens and earlier decode tokens of this step), ∧ the sliding window or the
  chunk measured on the stored absolute positions. A conversation turn attends as a decode
  step of many tokens, its padding slots hidden.

Chunked attention (Llama 4) splits each row into chunks of ``chunk`` tokens counted from the
row's first real token (``starts[b]``, its left padding), as transformers does; a token sees
the earlier tokens of its own chunk.

Kernel choice (``kernel="auto"``): FlexAttention on CUDA; on CPU, SDPA, which is measured
faster for the causal prefill (compiled flex on CPU ≈ 2× slower at L = 1024) and on par at
decode. Both kernels compute the same function and are tested against each other.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import (
    AuxRequest,
    BlockMask,
    and_masks,
    flex_attention,
    or_masks,
)

KERNELS = ("auto", "sdpa", "flex")
NULL_POSITION = -2  # stored position of the decode-time n-softmax's null slot (-1 = unused)
FLEX_BLOCK = 128


def choose_kernel(kernel: str, device: torch.device) -> str:
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got kernel={kernel!r}")
    if kernel == "auto":
        return "flex" if device.type == "cuda" else "sdpa"
    return kernel


# --- mask_mod factories ---------------------------------------------------------------------
def dense_mask(mask: Tensor):
    """A model's own prefill mask: ``mask`` (batch, seq, seq) bool, True = attend."""

    def model_mask(b, h, q_idx, kv_idx):
        return mask[b, q_idx, kv_idx]

    return model_mask


def padding_mask(key_padding: Tensor):
    """Padding keys hidden from real queries (padding queries see everything, stay finite)."""

    def padding(b, h, q_idx, kv_idx):
        return ~key_padding[b, kv_idx] | key_padding[b, q_idx]

    return padding


def causal_mask():
    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx

    return causal


def sliding_window_mask(window: int):
    def sliding(b, h, q_idx, kv_idx):
        return q_idx - kv_idx < window

    return sliding


def decode_valid_mask(lengths: Tensor):
    """Slots before ``lengths[b] + q_idx + 1`` of the static buffer: ``lengths`` (batch,) long."""

    def decode_valid(b, h, q_idx, kv_idx):
        return kv_idx < lengths[b] + q_idx + 1

    return decode_valid


def chunk_mask(chunk: int, starts: Tensor | None):
    """Query and key in the same chunk, chunks counted from ``starts[b]`` (batch,) long."""

    def same_chunk(b, h, q_idx, kv_idx):
        start = 0 if starts is None else starts[b]
        return (q_idx - start) // chunk == (kv_idx - start) // chunk

    return same_chunk


def decode_chunk_mask(positions: Tensor, seen: Tensor, starts: Tensor, chunk: int, group: int):
    """Stored tokens in the chunk of the query's absolute position ``seen + q_idx``."""

    def decode_chunk(b, h, q_idx, kv_idx):
        key, query = positions[b, h // group, kv_idx] - starts[b], seen + q_idx - starts[b]
        return key // chunk == query // chunk

    return decode_chunk


def decode_sliding_mask(positions: Tensor, seen: Tensor, window: int, group: int):
    """Stored tokens within ``window`` of the query's absolute position ``seen + q_idx``;
    ``positions`` (batch, kv_heads, cap), query head ``h`` reads KV head ``h // group``."""

    def decode_sliding(b, h, q_idx, kv_idx):
        return seen + q_idx - positions[b, h // group, kv_idx] < window

    return decode_sliding


def visible_mask(padding_slots: Tensor):
    """Slots not hidden: ``padding_slots`` (batch, cap) bool, True for a turn's padding."""

    def visible(b, h, q_idx, kv_idx):
        return ~padding_slots[b, kv_idx]

    return visible


def null_slot_mask(positions: Tensor):
    """The null slot: marked by ``NULL_POSITION`` in the stored positions (batch, kv_heads, cap).

    Read from a buffer rather than computed as ``cap - 1``: an index derived from a (possibly
    symbolic) shape inside a compiled flex graph fails to lower on CPU.
    """

    def null_slot(b, h, q_idx, kv_idx):
        return positions[b, 0, kv_idx] == NULL_POSITION

    return null_slot


def null_slot_score(positions: Tensor, logit: float):
    """score_mod pinning the (zero) key in the null slot to ``logit``: with ``logit = ln n`` the
    attention weights become the n-softmax."""

    def null_score(score, b, h, q_idx, kv_idx):
        return torch.where(positions[b, 0, kv_idx] == NULL_POSITION, logit, score)

    return null_score


def dense_partial_block_mask(
    mask_mod, batch: int, heads: int, q_len: int, kv_len: int, device: torch.device
):
    """A BlockMask that evaluates ``mask_mod`` on every block (none skipped as empty or full),
    on ``device`` (the queries').

    Built once per prompt for decoding: the tensors ``mask_mod`` captures change in place
    every step, so no block may be classified ahead of time.
    """
    q_blocks = -(-q_len // FLEX_BLOCK)
    kv_blocks = -(-kv_len // FLEX_BLOCK)
    num = torch.full((batch, heads, q_blocks), kv_blocks, dtype=torch.int32, device=device)
    idx = torch.arange(kv_blocks, dtype=torch.int32, device=device)
    idx = idx.repeat(batch, heads, q_blocks, 1)
    return BlockMask.from_kv_blocks(
        num, idx, BLOCK_SIZE=FLEX_BLOCK, mask_mod=mask_mod, seq_lengths=(q_len, kv_len)
    )


# --- attention -------------------------------------------------------------------------------
def _bhsd_to_bshd(out: Tensor) -> Tensor:
    return out.transpose(1, 2).contiguous()


def prefill_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float,
    key_padding: Tensor | None,
    sliding_window: int | None,
    kernel: str,
    model_mask: Tensor | None = None,
    chunk: int | None = None,
    starts: Tensor | None = None,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Unpruned prompt attention. q (b, hq, L, d), k/v (b, hkv, L, d) -> (b, L, hq, d), and
    with ``return_lse`` (FlexAttention, all queries) the rows' log-sum-exp (b, hq, L) fp32.

    ``model_mask`` (b or 1, 1, L, L) bool: the model's own mask (bidirectional image or prefix
    blocks, ...), used instead of the causal one; padding is still applied here. ``chunk``:
    the layer's attention chunk, counted from ``starts`` (b,) long, each row's left padding
    (None: no padding). Queries may be
    only the prompt's last ones (q (b, hq, t, d), t < L: a model that computes only the tokens
    it returns logits for in its last layers, as Gemma 4's KV-shared layers do)."""
    b, _, q_len, _ = q.shape
    kv_len = k.shape[2]
    dense = None if model_mask is None else model_mask[:, 0].expand(b, q_len, kv_len)
    if chunk is not None and kv_len <= chunk:
        chunk = None  # every real token in the first chunk: causal
    if kernel == "flex" and q_len == kv_len:
        mods = [causal_mask() if dense is None else dense_mask(dense)]
        if key_padding is not None:
            mods.append(padding_mask(key_padding))
        if sliding_window is not None:
            mods.append(sliding_window_mask(sliding_window))
        if chunk is not None:
            mods.append(chunk_mask(chunk, starts))
        mask_mod = and_masks(*mods) if len(mods) > 1 else mods[0]
        block_mask = torch.nn.attention.flex_attention.create_block_mask(
            mask_mod, b if key_padding is not None or dense is not None else None, None,
            q_len, kv_len, device=q.device,
        )  # fmt: skip
        if return_lse:
            out, aux = flex_attention(
                q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True,
                return_aux=AuxRequest(lse=True),
            )  # fmt: skip
            return _bhsd_to_bshd(out), aux.lse
        out = flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True)
        return _bhsd_to_bshd(out)
    if return_lse:
        raise ValueError("return_lse needs kernel='flex' and a query for every key")
    plain = key_padding is None and sliding_window is None and dense is None and chunk is None
    if plain and q_len == kv_len:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
        return _bhsd_to_bshd(out)
    q_pos = torch.arange(kv_len - q_len, kv_len, device=q.device)
    k_pos = torch.arange(kv_len, device=q.device)
    allowed = (k_pos[None, :] <= q_pos[:, None])[None] if dense is None else dense
    if key_padding is not None:
        q_padding = key_padding[:, kv_len - q_len :]
        allowed = allowed & (~key_padding[:, None, :] | q_padding[:, :, None])
    if sliding_window is not None:
        allowed = allowed & (q_pos[:, None] - k_pos[None, :] < sliding_window)
    if chunk is not None:
        start = 0 if starts is None else starts[:, None, None]
        allowed = allowed & ((q_pos[:, None] - start) // chunk == (k_pos[None, :] - start) // chunk)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=allowed[:, None], scale=scale, enable_gqa=True
    )
    return _bhsd_to_bshd(out)


def leading_padding(key_padding: Tensor | None) -> Tensor | None:
    """(batch,) long: each row's padding before its first real token (None: no padding)."""
    if key_padding is None:
        return None
    return (~key_padding).long().cumsum(dim=1).eq(0).sum(dim=1)


def decode_attention(
    q: Tensor,
    keys: Tensor,
    values: Tensor,
    *,
    lengths: Tensor,
    positions: Tensor,
    seen: Tensor,
    scale: float,
    sliding_window: int | None,
    kernel: str,
    block_mask: BlockMask | None = None,
    null_logit: float | None = None,
    chunk: int | None = None,
    starts: Tensor | None = None,
    padding_slots: Tensor | None = None,
) -> Tensor:
    """New tokens over the static buffers. q (b, hq, t, d), keys/values (b, hkv, cap, d),
    lengths (b,), positions (b, hkv, cap), seen () -> (b, t, hq, d). A chunked layer's
    ``chunk`` counts from ``starts`` (b,), the rows' left padding. ``padding_slots`` (b, cap) bool:
    slots no query sees (a conversation turn's padding; SDPA only, flex has it in its block
    mask).

    ``null_logit`` (= ln n) turns the softmax into the n-softmax ``exp(s)/(n + Σ exp(s))``: the
    last slot of the buffers is then a null slot (K = V = 0, never written) that every query
    sees with its logit pinned to ``ln n``."""
    if kernel == "flex":
        score_mod = None if null_logit is None else null_slot_score(positions, null_logit)
        out = flex_attention(
            q, keys, values, score_mod=score_mod, block_mask=block_mask, scale=scale,
            enable_gqa=True,
        )  # fmt: skip
        return _bhsd_to_bshd(out)
    t, cap = q.shape[2], keys.shape[2]
    slots = torch.arange(cap, device=q.device)
    steps = torch.arange(t, device=q.device)
    allowed = slots[None, None, :] < (lengths[:, None, None] + steps[None, :, None] + 1)
    if padding_slots is not None:
        allowed = allowed & ~padding_slots[:, None, :]
    allowed = allowed[:, None]  # (b, 1, t, cap)
    q_pos = (seen + steps)[None, None, :, None]  # (1, 1, t, 1)
    k_pos = positions[:, :, None, :]  # (b, hkv, 1, cap)
    local = None
    if sliding_window is not None:
        local = q_pos - k_pos < sliding_window
    if chunk is not None:
        start = starts[:, None, None, None]
        local = (q_pos - start) // chunk == (k_pos - start) // chunk
    if local is not None:
        group = q.shape[1] // positions.shape[1]
        allowed = (allowed & local).repeat_interleave(group, dim=1)
    mask = allowed
    if null_logit is not None:
        mask = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device)
        mask = mask.masked_fill(~allowed, -math.inf)
        mask[..., -1] = null_logit
    out = F.scaled_dot_product_attention(
        q, keys, values, attn_mask=mask, scale=scale, enable_gqa=True
    )
    return _bhsd_to_bshd(out)


def decode_block_mask(
    lengths: Tensor,
    positions: Tensor,
    seen: Tensor,
    sliding_window: int | None,
    q_heads: int,
    q_len: int = 1,
    null_slot: bool = False,
    chunk: int | None = None,
    starts: Tensor | None = None,
    padding_slots: Tensor | None = None,
) -> BlockMask:
    """The flex decode mask, built once per prompt (see :func:`dense_partial_block_mask`).
    Global layers share one; a sliding-window or chunked layer needs its own (its stored
    positions). ``padding_slots`` (b, cap) bool: slots no query sees (a turn's padding)."""
    mod = decode_valid_mask(lengths)
    if padding_slots is not None:
        mod = and_masks(mod, visible_mask(padding_slots))
    heads = 1
    group = q_heads // positions.shape[1]
    if sliding_window is not None:
        mod = and_masks(mod, decode_sliding_mask(positions, seen, sliding_window, group))
        heads = q_heads
    if chunk is not None:
        mod = and_masks(mod, decode_chunk_mask(positions, seen, starts, chunk, group))
        heads = q_heads
    if null_slot:
        mod = or_masks(mod, null_slot_mask(positions))
    batch, cap = lengths.shape[0], positions.shape[2]
    return dense_partial_block_mask(mod, batch, heads, q_len, cap, positions.device)
