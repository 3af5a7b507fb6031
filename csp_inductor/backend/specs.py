"""What the cache holds for each decoder layer: :func:`layer_specs`."""

from __future__ import annotations

from torch import nn

from .. import compat
from ..cache_layer import LayerSpec
from ..model_layout import ModelLayout, self_attention


def layer_specs(layout: ModelLayout, head_shards: dict[int, int]) -> list[LayerSpec]:
    """Every decoder layer's cache spec; an attention layer's for its heads on this rank
    (``head_shards[i]``: over how many tensor-parallel ranks they are split)."""
    specs = []
    for i, (layer, kind) in enumerate(zip(layout.decoder.layers, layout.layer_types, strict=True)):
        if kind == "recurrent":
            specs.append(LayerSpec(kind="recurrent", states=layout.states[i]))
        elif kind in ("shared", "none"):
            specs.append(LayerSpec(kind=kind))
        else:
            specs.append(_attention_spec(layer, layout.windows[i], head_shards[i]))
    return specs


def _attention_spec(layer: nn.Module, window: int | None, shards: int) -> LayerSpec:
    """The cache of a decoder layer's self-attention, from its module (layers of one model may
    differ, e.g. Gemma 4's global layers): KV heads and head dim, or an MLA layer's latent. The
    heads are this rank's of the ``shards`` its heads are split over by tensor parallelism (the
    config and ``out_features`` count all ranks')."""
    attn = self_attention(layer)
    cfg = attn.config
    q_heads = cfg.num_attention_heads
    if compat.caches_latent(attn):
        return LayerSpec(
            1, attn.kv_lora_rank, window, value_dim=attn.qk_rope_head_dim, latent=True,
            q_heads=q_heads,
        )  # fmt: skip
    if getattr(attn, "kv_lora_rank", None) is not None:  # MLA caching per-head K/V
        return LayerSpec(
            q_heads, attn.qk_head_dim, window, value_dim=attn.v_head_dim, q_heads=q_heads
        )
    head_dim = getattr(attn, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    k_proj = getattr(attn, "k_proj", None)
    if isinstance(k_proj, nn.Linear):
        kv_heads = k_proj.out_features // head_dim
    else:
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    return LayerSpec(kv_heads // shards, head_dim, window, q_heads=q_heads // shards)
