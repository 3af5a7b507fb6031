"""What the backend needs to know about a transformers model: its :class:`ModelLayout`.

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

from . import compat

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
class ModelLayout:
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


def detect(model: nn.Module, attn_name: str) -> ModelLayout:
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
    return ModelLayout(
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


def modality(
    layout: ModelLayout, input_ids: Tensor | None, token_types: Tensor | None
) -> Tensor | None:
    """(batch, seq) bool, True for visual tokens; None when it cannot be known."""
    if layout.token_types and token_types is not None:
        return token_types > 0
    if input_ids is None:
        return None
    is_image = torch.zeros_like(input_ids, dtype=torch.bool)
    for token in layout.token_ids:
        is_image |= input_ids == token
    return is_image
