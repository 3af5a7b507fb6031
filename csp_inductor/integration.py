"""transformers integration: what the backend needs to know about a model, and the attention and
mask functions it registers.

Everything is detected from the model and its config (:func:`detect`): the text decoder, which
of its layers are attention layers (and which hold recurrent states or reuse another layer's
K/V), each layer's sliding window, and how a prompt marks its visual tokens. The few families
detection cannot handle are in :data:`EXCEPTIONS`, with the reason.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
import transformers
from torch import Tensor, nn

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without distributed: no DTensor reaches the attention
    DTensor = ()

from . import compat
from .attention import decode_attention, prefill_attention
from .labels import DECODE_ATTENTION, PREFILL_ATTENTION, SCORING, label

# config attributes holding the ids of placeholder tokens that stand for visual (or audio)
# input: the tokens CSP treats as the image modality
PLACEHOLDER_ATTRS = (
    "image_token_id", "image_token_index", "video_token_id", "video_token_index",
    "audio_token_id", "audio_token_index",
)  # fmt: skip
# decoder layer types (transformers' ``layer_types``) by what the cache holds for them
ATTENTION_TYPES = ("full_attention", "sliding_attention", "chunked_attention")
RECURRENT_TYPES = ("linear_attention", "conv")  # conv/recurrent states, kept whole

# Families detection would accept but the backend cannot serve, and why.
EXCEPTIONS: dict[str, str] = {
    **{
        name: (
            "images reach its decoder only as cross-attention K/V; the self-attention cache "
            "holds text and one placeholder per image, so there is nothing visual to prune"
        )
        for name in ("mllama", "idefics")
    },
}


@dataclass
class Family:
    """What :func:`detect` found. ``layer_types[i]`` is ``"attention"`` (pruned),
    ``"recurrent"`` (states kept as transformers keeps them), ``"shared"`` (reads the K/V of
    layer ``kv_source[i]``) or ``"none"`` (no attention, nothing cached); ``windows[i]`` the
    sliding window of attention layer ``i``, ``chunks[i]`` its attention chunk (Llama 4)."""

    decoder: nn.Module
    attn_target: str | dict[str, str]  # what set_attn_implementation selects our attention with
    token_ids: tuple[int, ...]  # visual placeholder ids
    token_types: bool  # forward takes mm_token_type_ids (0 text, > 0 visual)
    layer_types: list[str]
    windows: list[int | None]
    chunks: list[int | None]
    states: dict[int, int] = field(default_factory=dict)  # recurrent layer -> its state count
    kv_source: dict[int, int] = field(default_factory=dict)

    @property
    def multimodal(self) -> bool:
        return bool(self.token_ids) or self.token_types

    @property
    def recurrent(self) -> bool:
        return "recurrent" in self.layer_types


def _unsupported(model: nn.Module, why: str) -> TypeError:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return TypeError(
        f"csp_inductor cannot serve model_type={model_type!r} ({type(model).__name__}): {why}"
    )


def find_decoder(model: nn.Module) -> nn.Module:
    """The text decoder: ``model.get_decoder()``, descending through ``.model`` until a module
    with ``.layers``."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    while not isinstance(getattr(decoder, "layers", None), nn.ModuleList):
        inner = getattr(decoder, "model", None)
        if not isinstance(inner, nn.Module) or inner is decoder:
            raise _unsupported(
                model, f"its decoder ({type(decoder).__name__}, from get_decoder()) has no "
                "`.layers` list of decoder layers",
            )  # fmt: skip
        decoder = inner
    return decoder


SELF_ATTENTION_ATTRS = ("self_attn", "self_attention", "attention", "attn")


def self_attention(layer: nn.Module) -> nn.Module | None:
    for name in SELF_ATTENTION_ATTRS:
        module = getattr(layer, name, None)
        if isinstance(module, nn.Module) and hasattr(module, "layer_idx"):
            return module
    return None


def _attn_target(model: nn.Module, decoder: nn.Module, name: str) -> str | dict[str, str]:
    config = model.config
    if decoder.config is config:  # "" is the top-level config alone (not a vision tower's)
        has_subs = any(getattr(config, sub, None) is not None for sub in _sub_configs(config))
        return {"": name} if has_subs else name
    for sub in _sub_configs(config):
        if getattr(config, sub, None) is decoder.config:
            return {sub: name}
    raise _unsupported(
        model, "its decoder's config is neither the model's config nor one of its sub-configs "
        f"({', '.join(_sub_configs(config)) or 'none'})",
    )  # fmt: skip


def _sub_configs(config) -> list[str]:
    return list(getattr(config, "sub_configs", {}) or {})


def _layer_kinds(text_config) -> tuple[list[str], list[dict]]:
    """transformers' cache layer type of every decoder layer (what its own cache would hold),
    with the per-layer arguments (sliding window, number of states) it would build it with."""
    return compat.layer_types_and_kwargs(text_config)


def _kv_sources(model: nn.Module, text_config) -> dict[int, int]:
    """Layers that reuse another layer's K/V (Gemma 3n/4): consumer -> the last storing layer of
    its type."""
    modes = compat.kv_sharing_modes(text_config)
    if modes is None:
        return {}
    types, last, sources = list(text_config.layer_types), {}, {}
    for i, mode in enumerate(modes):
        if mode == "reuse":
            if types[i] not in last:
                raise _unsupported(
                    model, f"kv_sharing_modes[{i}] is 'reuse' but no earlier layer of its type "
                    f"({types[i]!r}) stores K/V; the backend needs the K/V to come from a layer "
                    "of this model",
                )  # fmt: skip
            sources[i] = last[types[i]]
        else:
            last[types[i]] = i
    return sources


def _placeholder_ids(config, sub_names: list[str]) -> tuple[int, ...]:
    """Placeholder ids in the config, its text config and its other sub-configs (Phi-4-style
    models keep them in their encoders' configs)."""
    configs = [config, config.get_text_config()]
    configs += [getattr(config, name) for name in sub_names if getattr(config, name, None)]
    ids = (getattr(c, attr, None) for c in configs for attr in PLACEHOLDER_ATTRS)
    return tuple(dict.fromkeys(i for i in ids if isinstance(i, int)))


def detect(model: nn.Module, attn_name: str) -> Family:
    """Inspect ``model`` (a transformers causal LM or VLM); raise a TypeError naming what is
    missing when the backend cannot serve it."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if config is None or not hasattr(config, "get_text_config"):
        raise _unsupported(model, "it is not a transformers model (no config)")
    if model_type in EXCEPTIONS:
        raise _unsupported(model, EXCEPTIONS[model_type])
    decoder = find_decoder(model)
    text = decoder.config
    kinds, layer_kwargs = _layer_kinds(text)
    if len(kinds) != len(decoder.layers):
        raise _unsupported(
            model, f"its config lists {len(kinds)} layer types for {len(decoder.layers)} layers"
        )
    sources = _kv_sources(model, text)
    layer_types, windows, chunks, states = [], [], [], {}
    for i, (layer, kind) in enumerate(zip(decoder.layers, kinds, strict=True)):
        window = chunk = None
        if i in sources:
            layer_types.append("shared")
        elif kind == "dummy":  # an MLP/MoE-only layer: nothing cached
            layer_types.append("none")
        elif kind in RECURRENT_TYPES:
            if compat.LinearAttentionLayer is None:
                raise _unsupported(
                    model, f"decoder layer {i} is {kind!r}, whose state this transformers "
                    f"({transformers.__version__}) keeps in a model-specific cache; recurrent "
                    "layers need transformers >= 5.3",
                )  # fmt: skip
            layer_types.append("recurrent")
            states[i] = layer_kwargs[i].get("number_of_states", 1)
        elif kind in ATTENTION_TYPES:
            attn = self_attention(layer)
            if attn is None or attn.layer_idx != i:
                raise _unsupported(
                    model, f"decoder layer {i} ({type(layer).__name__}) has no self-attention "
                    f"module with layer_idx={i} (looked for attributes {SELF_ATTENTION_ATTRS})",
                )  # fmt: skip
            _check_latent(model, attn, i)
            layer_types.append("attention")
            if kind == "chunked_attention":  # transformers sizes its cache by the chunk
                chunk = layer_kwargs[i]["sliding_window"]
            else:
                window = layer_kwargs[i].get("sliding_window")
        else:
            raise _unsupported(
                model, f"decoder layer {i} is of type {kind!r}; supported: {ATTENTION_TYPES} "
                f"(pruned) and {RECURRENT_TYPES} (kept whole)",
            )  # fmt: skip
        windows.append(window)
        chunks.append(chunk)
    if "attention" not in layer_types:
        raise _unsupported(model, "its decoder has no self-attention layer to prune")
    subs = [
        name for name in _sub_configs(config)
        if getattr(config, name, None) is not None and getattr(config, name) is not text
    ]  # fmt: skip
    token_ids = _placeholder_ids(config, subs)
    token_types = "mm_token_type_ids" in inspect.signature(model.forward).parameters
    if subs and not token_ids and not token_types:
        raise _unsupported(
            model, f"it has encoders ({', '.join(subs)}) but no placeholder token id (looked for "
            f"{', '.join(PLACEHOLDER_ATTRS)} in its configs) and its forward takes no "
            "mm_token_type_ids, so visual tokens cannot be told from text",
        )  # fmt: skip
    return Family(
        decoder=decoder, attn_target=_attn_target(model, decoder, attn_name), token_ids=token_ids,
        token_types=token_types, layer_types=layer_types, windows=windows, chunks=chunks,
        states=states, kv_source=sources,
    )  # fmt: skip


MLA_ATTRS = ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "expand_kv")


def _check_latent(model: nn.Module, attn: nn.Module, index: int) -> None:
    """An attention module with a ``kv_lora_rank`` is multi-head latent attention, which the
    backend serves as transformers' DeepSeek V2/V3 family writes it: it caches the normalised
    latent ``kv_nope`` (batch, 1, seq, kv_lora_rank) and the rotary key ``k_rot`` and expands
    them per head with ``kv_b_proj`` (no bias: a zero latent expands to zero K/V) into
    ``[k_nope, k_rot]`` keys and values."""
    if not compat.caches_latent(attn):  # (transformers < 5.3 caches MLA's per-head K/V)
        return
    missing = [name for name in MLA_ATTRS if getattr(attn, name, None) is None]
    proj = getattr(attn, "kv_b_proj", None)
    if not isinstance(proj, nn.Linear) or proj.bias is not None:
        missing.append("kv_b_proj (a Linear without bias)")
    if missing:
        raise _unsupported(
            model, f"layer {index} caches a multi-head latent (kv_lora_rank={attn.kv_lora_rank}) "
            f"but its attention module has no {', '.join(missing)}, which the backend needs to "
            "score and store the latent",
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


def modality(family: Family, input_ids: Tensor | None, token_types: Tensor | None) -> Tensor | None:
    """(batch, seq) bool, True for visual tokens; None when it cannot be known."""
    if family.token_types and token_types is not None:
        return token_types > 0
    if input_ids is None:
        return None
    is_image = torch.zeros_like(input_ids, dtype=torch.bool)
    for token in family.token_ids:
        is_image |= input_ids == token
    return is_image


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


def _remember(cache, layer, query: Tensor, padding: Tensor | None, is_image: Tensor | None):
    """A bounded cache keeps the queries of the last tokens, to re-prune with."""
    if layer.queries is not None:
        torch.ops.csp_inductor.remember_(
            layer.queries, cache.ring_positions, cache.ring_images, query, cache.seen, padding,
            is_image,
        )  # fmt: skip


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
    is the layer's window, already known from :func:`detect`. Returns (b, t, hq, d) and no
    attention weights.
    """
    backend = module.csp_backend
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    index = module.layer_idx
    source = backend.family.kv_source.get(index, index)
    window, chunk = backend.family.windows[source], backend.family.chunks[source]
    cache = backend.active
    if cache is None or cache.phase == "prefill":
        model_mask = attention_mask if isinstance(attention_mask, Tensor) else None
        if model_mask is not None and (model_mask.dtype != torch.bool or model_mask.dim() != 4):
            raise ValueError(
                "csp_inductor reads a model's own prefill mask as (batch, 1, q, kv) bool; got "
                f"attention_mask of dtype {model_mask.dtype} and shape {tuple(model_mask.shape)}"
            )
        stores = cache is not None and index not in backend.family.kv_source
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
            plain and backend.kernel == "flex"
            and (query.is_cuda or not torch.compiler.is_compiling())
        )  # fmt: skip
        # On the CPU a window scorer's last W rows are computed once, explicitly, for both
        # their attention and the scores; the fast kernel runs on the other rows
        shared_rows = (
            plain and backend.kernel == "sdpa" and query.device.type == "cpu"
            and not backend.layer_inputs
        )  # fmt: skip
        lse = window_scores = None
        with label(PREFILL_ATTENTION):
            if shared_rows:
                out, window_scores = torch.ops.csp_inductor.window_prefill(
                    query, key, value, backend.is_image, backend.key_padding,
                    backend.prefill_index, scale,
                )  # fmt: skip
            else:
                out = prefill_attention(
                    query, key, value, scale=scale, key_padding=backend.key_padding,
                    sliding_window=None if model_mask is not None else window,
                    chunk=None if model_mask is not None else chunk, starts=backend.starts,
                    kernel=backend.kernel, model_mask=model_mask, return_lse=return_lse,
                )  # fmt: skip
        if return_lse:
            out, lse = out
        if stores:
            _remember(cache, layer, query, backend.key_padding, backend.is_image)
            if layer.spec.latent:  # store the latents
                (key, value), layer.prompt = layer.prompt, None
            _compact(
                module, cache, layer, query, key, value, scale, cache.lengths, lse,
                window_scores=window_scores,
            )  # fmt: skip
        return out, None
    layer = cache.layers[source]
    _check_heads(layer.spec, query, key)
    turn = cache.phase in ("turn", "reread")  # a re-read chunk attends as a turn does
    block_mask = None
    if backend.kernel == "flex":  # a turn's mask is the turn's, whatever its length
        step = "turn" if turn else query.shape[2]
        block_mask = backend.block_masks[(step, source if window or chunk else None)]
    with label(DECODE_ATTENTION):
        out = decode_attention(
            query, key, value, lengths=cache.lengths, positions=layer.positions, seen=cache.seen,
            scale=scale, sliding_window=window, kernel=backend.kernel,
            block_mask=block_mask, null_logit=backend.null_logit, chunk=chunk, starts=cache.starts,
            hidden=backend.hidden if turn else None,
        )  # fmt: skip
    if cache.phase == "reread":
        reread = backend.reread
        torch.ops.csp_inductor.reconstruct_scores_(
            reread.scores[index], query, key, layer.images, cache.lengths, backend.hidden,
            reread.scored, reread.is_image, reread.policy.window_n, scale,
            reread.how.reduce == "max",
        )  # fmt: skip
        return out, None
    if index not in backend.family.kv_source:
        padding, is_image = (backend.key_padding, backend.is_image) if turn else (None, None)
        _remember(cache, layer, query, padding, is_image)
    if turn and index not in backend.family.kv_source:
        # the turn's kept tokens replace it in the buffers, after the kept prefix
        (key, value), layer.prompt = layer.prompt, None
        _compact(module, cache, layer, query, key, value, scale, cache.turn, turn=True)
    return out, None


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
    module, cache, layer, query, key, value, scale, kept, lse=None, turn=False, window_scores=None
):
    """Select one layer's kept tokens of the prompt (``kept[b]`` per row), or of a turn, which
    go after the kept prefix at their absolute positions, and store them. An MLA layer stores
    its latents and scores in their space. A policy that ranks by the layer's own inputs gets
    its scores from what the backend collected of them for this forward (eagerly)."""
    backend, score_key, scores = module.csp_backend, None, None
    if backend.layer_inputs:  # (collected by an eager forward's hooks)
        with label(SCORING):
            inputs = backend.layer_inputs.pop(module.layer_idx)
            scores = backend.policy.layer_scores(module, inputs, key, value)
    if layer.spec.latent:
        query, score_key = absorb(module, query, key, value)
    start, offset = (cache.lengths, cache.seen) if turn else (None, None)
    index = backend.prefill_index  # the policy, or everything (before a re-read, ...)
    torch.ops.csp_inductor.compact_(
        query, key, value, backend.is_image, backend.key_padding, layer.keys, layer.values,
        layer.positions, kept, index, scale, score_key, lse, start, offset,
        layer.images, scores, window_scores,
    )  # fmt: skip
