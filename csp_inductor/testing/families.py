"""Tiny random-weight models of any family, built from transformers' own config defaults,
and their placeholder inputs (no pixels)."""

from __future__ import annotations

import inspect

import torch

from ..compat import BEFORE_5_3
from ..model_layout import PLACEHOLDER_ATTRS
from .tiny import IMAGE_ID, PAD_ID, TEXT_IDS, TINY_VOCAB, VIDEO_ID

TINY_TEXT = dict(
    hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, global_head_dim=32, vocab_size=TINY_VOCAB + 32, max_position_embeddings=1024,
    moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=4,
    num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2, linear_num_key_heads=2,
    linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
    hidden_size_per_layer_input=8, vocab_size_per_layer_input=TINY_VOCAB + 32,
    sliding_window=24, kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=16, qk_nope_head_dim=16,
    v_head_dim=24, attention_chunk_size=16,
)  # fmt: skip
TINY_VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=1, depth=1, num_attention_heads=2,
    num_heads=2, embed_dim=32, out_hidden_size=64, projection_dim=32,
)  # fmt: skip
# what the defaults of a family need changed to make a tiny model: (text config, top-level)
# overrides; a top-level dict value updates that sub-config
TINY_OVERRIDES: dict[str, tuple[dict, dict]] = {
    # the defaults are all attention; checkpoints interleave short-conv layers
    "lfm2_vl": ({"layer_types": ["conv", "full_attention"], "full_attn_idxs": [1]}, {}),
    "molmo2": ({}, {"adapter_config": {"vision_feature_layer": [-1]}}),
    # the multimodal rotary sections must add up to half the (tiny) head dim
    **{
        name: ({"rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3]}}, {})
        for name in ("qwen2_vl", "qwen2_5_vl", "glm4v")
    },
    # plain rotary over the (tiny) rope part of the head, not YaRN's checkpoint scaling
    "mistral4": (
        {
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "llama_4_scaling_beta": 0.1,
                "original_max_position_embeddings": 64,
            },
        },
        {},
    ),
    # the last two layers reuse the K/V of the last sliding and the last full layer before them
    "gemma3n_text": (
        {
            "layer_types": ["sliding_attention", "full_attention"] * 2,
            "num_kv_shared_layers": 2,
            "activation_sparsity_pattern": [0.0] * 4,
        },
        {},
    ),
    "gemma4": (  # as above, and images attend to themselves bidirectionally (sliding layers)
        {
            "layer_types": ["sliding_attention", "full_attention"] * 2,
            "num_kv_shared_layers": 2,
            "use_bidirectional_attention": "vision",
        },
        {},
    ),
}
TINY_PLACEHOLDERS = {"image": IMAGE_ID, "video": VIDEO_ID, "audio": VIDEO_ID + 4}


def _shrunk(config_dict: dict, values: dict) -> dict:
    return {k: (values[k] if k in values and v is not None else v) for k, v in config_dict.items()}


def known_model_types(*model_types: str) -> list[str]:
    """Those of ``model_types`` the installed transformers has (families come and go)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return [model_type for model_type in model_types if model_type in CONFIG_MAPPING_NAMES]


def tiny_family_config(model_type: str):
    """A tiny config of ``model_type`` from transformers' defaults: 2 decoder layers (one per
    layer type, in the order the defaults first use them), 64 hidden, GQA 4/2 heads, a
    160-token vocabulary with the placeholders at :data:`IMAGE_ID`/:data:`VIDEO_ID`, and a
    one-layer vision tower."""
    from transformers import AutoConfig

    default = AutoConfig.for_model(model_type)
    text_over, top_over = TINY_OVERRIDES.get(model_type, ({}, {}))
    text_default = default.get_text_config(decoder=True)
    text = _shrunk(text_default.to_dict(), TINY_TEXT)
    text.pop("per_layer_config", None)
    types = text.get("layer_types")
    if types:
        text["layer_types"] = list(dict.fromkeys(types))
    if text.get("kv_lora_rank"):  # MLA expands the latent into one K/V per query head
        text["num_key_value_heads"] = text["num_attention_heads"]
    if "qk_head_dim" in text:  # derived, and stored by transformers < 5.3
        text["qk_head_dim"] = text["qk_nope_head_dim"] + text["qk_rope_head_dim"]
    text.update(text_over)
    text["num_hidden_layers"] = len(text["layer_types"]) if types else 2
    if text.get("mlp_layer_types"):  # one dense and one MoE MLP where the defaults have both
        mlps = list(dict.fromkeys(text["mlp_layer_types"]))
        text["mlp_layer_types"] = (mlps * 2)[: text["num_hidden_layers"]]
    for key in [k for k in text if k.endswith(("_token_id", "_token_index"))]:
        if isinstance(text[key], int) and text[key] >= TINY_VOCAB:
            text[key] = TINY_VOCAB - 1
    if text_default is default:
        return type(default)(**text, **top_over)
    top = {}
    for name in default.sub_configs:
        sub = getattr(default, name, None)
        if sub is text_default:
            top[name] = text
        elif sub is not None:
            top[name] = _shrunk(sub.to_dict(), TINY_VISION)
    # placeholders (some configs name them through attribute_map) at the tiny ids, whether set
    # or left to checkpoints (None); other special ids inside the tiny vocabulary
    aliases = {real: alias for alias, real in type(default).attribute_map.items()}
    for key, value in default.to_dict().items():
        name = aliases.get(key, key)
        if name in PLACEHOLDER_ATTRS:
            top[key] = TINY_PLACEHOLDERS[name.split("_")[0]]
        elif key.endswith(("_token_id", "_token_index")) and isinstance(value, int):
            top[key] = min(value, TINY_VOCAB + 16)
    for key, value in top_over.items():
        top[key] = {**top[key], **value} if isinstance(value, dict) else value
    return type(default)(**top)


def tiny_family_model(model_type: str, seed: int = 0):
    """A tiny random model of any image-text-to-text family, or of a text-only causal LM
    family (see :func:`tiny_family_config`), fp32, eval mode, sdpa attention."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    auto = AutoModelForCausalLM
    if model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        auto = AutoModelForImageTextToText
    torch.manual_seed(seed)
    model = auto.from_config(tiny_family_config(model_type))
    try:
        model.set_attn_implementation("sdpa")
    except ValueError:  # a sub-model without SDPA (BLIP-2's Q-Former) keeps its own, before 5.3
        if not BEFORE_5_3:
            raise
    return model.float().eval()


def placeholder_inputs(
    model, batch: int = 1, pads: list[int] | None = None, seed: int = 0, length: int = 96
) -> dict:
    """``generate`` kwargs for a family model without pixels: text with two runs of image
    placeholder tokens (the decoder sees their embeddings), left padding ``pads[b]``, and
    ``mm_token_type_ids`` / ``token_type_ids`` when the model's forward takes them."""
    gen = torch.Generator().manual_seed(seed)
    pads = [0] * batch if pads is None else list(pads)
    ids = torch.randint(*TEXT_IDS, (batch, length), generator=gen)
    is_image = torch.zeros(batch, length, dtype=torch.bool)
    # one image shorter and one longer than the tiny sliding window (24)
    for start, size in ((length // 4, 16), (length // 2, 32)):
        is_image[:, start : start + size] = True
    ids[is_image] = IMAGE_ID
    mask = (torch.arange(length)[None, :] >= torch.tensor(pads)[:, None]).long()
    ids[mask == 0] = PAD_ID
    is_image &= mask.bool()
    inputs = {"input_ids": ids, "attention_mask": mask}
    params = inspect.signature(model.forward).parameters
    for name in ("mm_token_type_ids", "token_type_ids"):
        if name in params:
            inputs[name] = is_image.long()
    return inputs
