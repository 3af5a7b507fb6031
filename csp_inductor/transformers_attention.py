"""The functions the backend registers with transformers: the attention function
(``AttentionInterface``) every pruned layer calls, and the mask function
(``AttentionMaskInterface``) that keeps transformers from building masks the backend makes.

The attention reads one thing besides its arguments: the :class:`~csp_inductor.backend.step.Step`
the backend made for the running forward (``module.csp_backend.step``), which holds the cache.
A forward is a prefill (a prompt, or tokens without a cache), where the attention runs over the
prompt and each stored layer compacts its kept tokens into the cache; or a cached forward
(decode steps, a conversation's turn, a re-read chunk), where it attends to the pruned cache.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without distributed: no DTensor reaches the attention
    DTensor = ()

from . import compat
from .attention import decode_attention, prefill_attention
from .labels import DECODE_ATTENTION, PREFILL_ATTENTION, SCORING, label
from .ops import compact_op, reconstruct_scores_op, remember_op, window_prefill_op


def model_mask(
    batch_size: int,
    q_length: int | None = None,
    kv_length: int = 0,
    q_offset=0,
    kv_offset=0,
    mask_function=None,
    allow_is_causal_skip: bool = True,
    device: torch.device | str = "cpu",
    **kwargs,
) -> Tensor | None:
    """The function registered with transformers' mask interface for the backend's attention.

    At prefill it returns the mask the model asks for, unless that is what the backend's
    attention builds by itself (causal, the layer's sliding window, the prompt's padding):
    then None. Otherwise (bidirectional image blocks, prefix blocks, any overlay) it is the
    model's mask as a dense (batch, 1, L, L) bool tensor, padding left to the backend. At decode
    (keys are the pruned cache, not the prompt) it returns None: decode masks are the backend's.
    Decode is told by the sizes the cache reports: the prompt's own length at prefill, the
    buffers' capacity (always more than the new tokens) after it. A conversation turn attends
    causally to the kept prefix and to itself; a model asking for more inside a turn (images
    attending bidirectionally) is refused (:func:`_check_causal_turn`). transformers < 5.3
    passes the queries' ``cache_position`` instead of their count and offset.
    """
    q_length, q_offset, device, allow_is_causal_skip = compat.mask_call(
        kwargs, q_length, q_offset, device, allow_is_causal_skip
    )
    if kv_length != q_length and q_length > 1 and not allow_is_causal_skip:
        _check_causal_turn(batch_size, q_length, q_offset, mask_function, device)
    if kv_length != q_length or allow_is_causal_skip:
        return None
    return compat.sdpa_mask(
        batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
        kv_offset=kv_offset, mask_function=mask_function, attention_mask=None,
        allow_is_causal_skip=False, use_vmap=kwargs.get("use_vmap", False), device=device,
    )  # fmt: skip


def _check_causal_turn(batch: int, q_length: int, q_offset, mask_function, device) -> None:
    """Raise when the model's mask over a turn's own tokens is not causal (a turn with images
    on a model whose images attend bidirectionally), which the turn attention does not apply.
    Checked where the mask is made eagerly (Gemma 3 makes its image overlay outside the
    compiled decoder); a mask made inside a compiled graph is not checked."""
    if torch.compiler.is_compiling():
        return
    block = compat.sdpa_mask(
        batch_size=batch, q_length=q_length, kv_length=q_length, q_offset=q_offset,
        kv_offset=q_offset, mask_function=mask_function, attention_mask=None,
        allow_is_causal_skip=False, use_vmap=True, device=device,
    )  # fmt: skip
    causal = torch.ones(q_length, q_length, dtype=torch.bool, device=device).tril()
    if block is not None and not torch.equal(block[:, 0], causal.expand_as(block[:, 0])):
        raise ValueError(
            "csp_inductor continues a conversation with causal attention over the new turn, but "
            "this model asks for a non-causal mask inside the turn (e.g. bidirectional attention "
            "among a new image's tokens); send new images in the first prompt of a conversation "
            "(a new cache), or continue with text only"
        )


def csp_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """The function registered with transformers' ``AttentionInterface``.

    query (b, hq, t, d); key/value (b, hkv, L or capacity, d) as the cache returned them (at
    prefill t = L, or t < L when the model computes only the prompt's last queries);
    ``attention_mask`` what :func:`model_mask` made (None, or the model's dense prefill mask,
    which then includes the layer's sliding window); ``sliding_window`` (passed by some models)
    is the layer's window, already known from the model's layout. Returns (b, t, hq, d) and no
    attention weights.
    """
    step = module.csp_backend.step
    if step is None:
        raise RuntimeError(
            "csp_inductor's attention ran outside a forward of the model it was compiled for "
            "(call the model, not its decoder)"
        )
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if step.cached:
        return _cached_attention(step, module, query, key, value, scale), None
    return _prefill_attention(step, module, query, key, value, attention_mask, scale), None


def _prefill_attention(step, module, query, key, value, attention_mask, scale) -> Tensor:
    """A prompt over itself (or tokens without a cache); a stored layer then compacts the
    prompt's kept tokens into the cache."""
    index, layout, cache = module.layer_idx, step.layout, step.cache
    source = layout.kv_source.get(index, index)  # (a layer sharing K/V: its source's window)
    window, chunk = layout.windows[source], layout.chunks[source]
    model_mask = attention_mask if isinstance(attention_mask, Tensor) else None
    if model_mask is not None and (model_mask.dtype != torch.bool or model_mask.dim() != 4):
        raise ValueError(
            "csp_inductor reads a model's own prefill mask as (batch, 1, q, kv) bool; got "
            f"attention_mask of dtype {model_mask.dtype} and shape {tuple(model_mask.shape)}"
        )
    stores = cache is not None and index not in layout.kv_source
    layer = cache.layers[index] if stores else None
    if stores:
        _check_heads(layer.spec, query, key)
    # a stored layer's prompt rows plain causal: no model mask, window or chunk, no latents
    plain = (
        stores and model_mask is None and window is None and chunk is None
        and not layer.spec.latent and query.shape[2] == key.shape[2]
    )  # fmt: skip
    # FlexAttention's per-row log-sum-exp is the scorer's where the rows are plain causal
    # (on CPU, reusing SDPA's is measured no faster: bench/bench_prefill.py; Inductor's CPU
    # flex cannot return it, torch 2.13)
    return_lse = (
        plain and step.kernel == "flex"
        and (query.is_cuda or not torch.compiler.is_compiling())
    )  # fmt: skip
    # On the CPU a window scorer's last W rows are computed once, explicitly, for both
    # their attention and the scores; the fast kernel runs on the other rows
    shared_rows = (
        plain and step.kernel == "sdpa" and query.device.type == "cpu" and not step.layer_inputs
    )
    lse = window_scores = None
    with label(PREFILL_ATTENTION):
        if shared_rows:
            out, window_scores = window_prefill_op(
                query, key, value, step.is_image, step.padding, step.keep, scale
            )
        else:
            out = prefill_attention(
                query, key, value, scale=scale, key_padding=step.padding,
                sliding_window=None if model_mask is not None else window,
                chunk=None if model_mask is not None else chunk, starts=step.starts,
                kernel=step.kernel, model_mask=model_mask, return_lse=return_lse,
            )  # fmt: skip
    if return_lse:
        out, lse = out
    if stores:
        _remember(cache, layer, query, step.padding, step.is_image)
        if layer.spec.latent:  # store the latents
            (key, value), layer.prompt = layer.prompt, None
        _compact(
            step, module, layer, query, key, value, scale, layer.lengths, lse,
            window_scores=window_scores,
        )  # fmt: skip
    return out


def _cached_attention(step, module, query, key, value, scale) -> Tensor:
    """New tokens over the pruned cache: decode steps, a turn (whose kept tokens a stored
    layer then compacts after the prefix) or a re-read chunk (whose attention scores the
    prompt)."""
    index, layout, cache = module.layer_idx, step.layout, step.cache
    source = layout.kv_source.get(index, index)
    window, chunk = layout.windows[source], layout.chunks[source]
    layer = cache.layers[source]
    _check_heads(layer.spec, query, key)
    padding_slots = step.padding_slots_of(source) if step.as_turn else None
    block_mask = None
    if step.kernel == "flex":
        masks = step.block_masks  # a layer's own, or the global layers' shared one
        block_mask = masks[source] if source in masks else masks[None]
    with label(DECODE_ATTENTION):
        out = decode_attention(
            query, key, value, lengths=layer.lengths, positions=layer.positions, seen=cache.seen,
            scale=scale, sliding_window=window, kernel=step.kernel, block_mask=block_mask,
            null_logit=step.null_logit, chunk=chunk, starts=cache.starts,
            padding_slots=padding_slots,
        )  # fmt: skip
    if step.reread is not None:
        reread = step.reread
        reconstruct_scores_op(
            reread.scores[index], query, key, layer.images, layer.lengths, padding_slots,
            reread.scored, reread.is_image, reread.policy.window_n, scale,
            reread.reconstruction.reduce == "max",
        )  # fmt: skip
        return out
    if index in layout.kv_source:
        return out
    turn = step.as_turn
    padding, is_image = (step.padding, step.is_image) if turn else (None, None)
    _remember(cache, layer, query, padding, is_image)
    if turn:  # the turn's kept tokens replace it in the buffers, after the kept prefix
        (key, value), layer.prompt = layer.prompt, None
        _compact(step, module, layer, query, key, value, scale, cache.turn, turn=True)
    return out


def _remember(cache, layer, query: Tensor, padding: Tensor | None, is_image: Tensor | None):
    """A bounded cache keeps the queries of the last tokens, to re-prune with."""
    if layer.queries is not None:
        remember_op(
            layer.queries, cache.ring_positions, cache.ring_images, query, cache.seen, padding,
            is_image,
        )  # fmt: skip


def _check_heads(spec, query: Tensor, key: Tensor) -> None:
    """The attention receives the KV heads its cache was made for: a parallel layout the
    backend did not detect would otherwise be served wrong, silently. (Static shapes: free when
    compiled.)"""
    if isinstance(query, DTensor):
        raise ValueError(
            "csp_inductor received the attention query as a DTensor (e.g. context or sequence "
            "parallelism), which it does not support; supported: tensor parallelism by heads "
            "(transformers' tp_plan), where each rank's attention gets plain tensors"
        )
    if not spec.latent and key.shape[1] != spec.kv_heads:
        raise ValueError(
            f"csp_inductor's cache is for {spec.kv_heads} KV heads ({spec.q_heads} query heads) "
            f"per layer, but the attention received key heads={key.shape[1]} (query heads="
            f"{query.shape[1]}): a parallel layout that compile() did not detect; supported: "
            "tensor parallelism by heads (transformers' tp_plan)"
        )


def _compact(
    step, module, layer, query, key, value, scale, kept, lse=None, turn=False, window_scores=None
):
    """Select one layer's kept tokens of the prompt (``kept[b]`` per row), or of a turn, which
    go after the kept prefix at their absolute positions, and store them. An MLA layer stores
    its latents and scores in their space. A policy that ranks by the layer's own inputs gets
    its scores from what the step collected of them (eagerly)."""
    cache, score_key, scores = step.cache, None, None
    if step.layer_inputs:  # (collected by an eager forward's hooks)
        with label(SCORING):
            inputs = step.layer_inputs.pop(module.layer_idx)
            scores = step.scorer.layer_scores(module, inputs, key, value)
    if layer.spec.latent:
        query, score_key = absorb(module, query, key, value)
    start, offset = (layer.lengths, cache.seen) if turn else (None, None)
    compact_op(
        query, key, value, step.is_image, step.padding, layer.keys, layer.values,
        layer.positions, kept, step.keep, scale, score_key, lse, start, offset,
        layer.images, scores, window_scores, step.layer_scores.get(layer.index),
    )  # fmt: skip


def absorb(module: nn.Module, query: Tensor, kv_nope: Tensor, k_rot: Tensor):
    """An MLA layer's scoring queries and keys, in the latent space (weight absorption).

    Head ``h``'s logit ``q_h · [W_h c_j ; r_j]`` (``W_h`` the key rows of ``kv_b_proj`` for head
    ``h``, ``c_j`` the latent, ``r_j`` the rotary key) equals ``[W_hᵀ q_h,nope ; q_h,rot] ·
    [c_j ; r_j]``: every head scores one shared key, the multi-query case of GQA, so a policy
    ranks the tokens the whole layer stores with the heads' scores summed, exactly as for one
    KV head of a GQA group. query (b, h, L, nope + rope), kv_nope (b, 1, L, rank), k_rot
    (b, 1, L, rope) -> (b, h, L, rank + rope), (b, 1, L, rank + rope)."""
    nope, heads = module.qk_nope_head_dim, query.shape[1]
    weight = module.kv_b_proj.weight.view(heads, nope + module.v_head_dim, -1)[:, :nope]
    q_latent = torch.einsum("bhld,hdr->bhlr", query[..., :nope], weight.to(query.dtype))
    return torch.cat((q_latent, query[..., nope:]), dim=-1), torch.cat((kv_nope, k_rot), dim=-1)
