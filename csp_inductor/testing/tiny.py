"""Tiny random-weight models of every supported family, with their inputs (text, images,
text, images, text per row), built from hand-written configs."""

from __future__ import annotations

import inspect

import torch

FAMILIES = (
    "llava",
    "llava_next",
    "qwen2_vl",
    "qwen2_5_vl",
    "idefics3",
    "smolvlm",
    "gemma3",
    "llama",
    "qwen2",
)
TEXT_ONLY = ("llama", "qwen2")
TINY_VOCAB = 128
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
IMAGE_ID, VIDEO_ID, VISION_START_ID, VISION_END_ID = 100, 101, 102, 103
TEXT_IDS = (3, 90)  # prompt text tokens are drawn from this range


def _text_kwargs(**overrides) -> dict:
    kwargs = dict(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
    )  # fmt: skip
    kwargs.update(overrides)
    return kwargs


def _tiny_config(family: str):
    import transformers as tf

    if family == "llama":
        return tf.LlamaConfig(**_text_kwargs())
    if family == "qwen2":
        return tf.Qwen2Config(**_text_kwargs())
    if family in ("llava", "llava_next"):
        vision = tf.CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            image_size=32, patch_size=8, projection_dim=32,
        )  # fmt: skip
        common = dict(
            vision_config=vision, text_config=tf.LlamaConfig(**_text_kwargs()),
            image_token_index=IMAGE_ID, vision_feature_select_strategy="default",
            vision_feature_layer=-1,
        )  # fmt: skip
        if family == "llava":
            return tf.LlavaConfig(**common)
        # one image shape, 32x64: a base tile and a 1x2 grid of tiles
        return tf.LlavaNextConfig(**common, image_grid_pinpoints=[[32, 64], [64, 32]])
    if family in ("qwen2_vl", "qwen2_5_vl"):
        rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
        text = _text_kwargs(rope_parameters=rope)
        vision = dict(
            depth=1, hidden_size=32, num_heads=2, patch_size=4, spatial_merge_size=2,
            temporal_patch_size=2,
        )  # fmt: skip
        if family == "qwen2_vl":
            vision.update(embed_dim=32, hidden_size=64, mlp_ratio=2)
            config_class = tf.Qwen2VLConfig
        else:
            vision.update(
                intermediate_size=64, out_hidden_size=64, window_size=16, fullatt_block_indexes=[0]
            )
            config_class = tf.Qwen2_5_VLConfig
        return config_class(
            text_config=text, vision_config=vision, image_token_id=IMAGE_ID,
            video_token_id=VIDEO_ID, vision_start_token_id=VISION_START_ID,
            vision_end_token_id=VISION_END_ID,
        )  # fmt: skip
    if family in ("idefics3", "smolvlm"):
        config_class = tf.Idefics3Config if family == "idefics3" else tf.SmolVLMConfig
        vision = dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            image_size=64, patch_size=8,
        )  # fmt: skip
        return config_class(
            vision_config=vision, text_config=tf.LlamaConfig(**_text_kwargs()).to_dict(),
            image_token_id=IMAGE_ID, scale_factor=2, pad_token_id=PAD_ID,
        )  # fmt: skip
    if family == "gemma3":
        # two sliding-window layers (window 24, shorter than the prompts) and a global one
        text = tf.Gemma3TextConfig(
            **_text_kwargs(num_hidden_layers=3),
            head_dim=16, query_pre_attn_scalar=16, sliding_window=24,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        )  # fmt: skip
        vision = tf.SiglipVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            image_size=32, patch_size=4,
        )  # fmt: skip
        return tf.Gemma3Config(
            text_config=text, vision_config=vision, mm_tokens_per_image=16,
            image_token_index=IMAGE_ID, boi_token_index=VISION_START_ID,
            eoi_token_index=VISION_END_ID,
        )  # fmt: skip
    raise ValueError(f"family must be one of {FAMILIES}, got family={family!r}")


def tiny_model(family: str, seed: int = 0):
    """A tiny random-weight model of ``family`` (see :data:`FAMILIES`), built from a fresh
    config (so ``set_attn_implementation`` on it touches no other model): fp32, eval mode, sdpa,
    2–3 decoder layers with GQA (4 query heads, 2 KV heads), a one-layer vision tower."""
    import transformers as tf

    classes = {
        "llava": tf.LlavaForConditionalGeneration,
        "llava_next": tf.LlavaNextForConditionalGeneration,
        "qwen2_vl": tf.Qwen2VLForConditionalGeneration,
        "qwen2_5_vl": tf.Qwen2_5_VLForConditionalGeneration,
        "idefics3": tf.Idefics3ForConditionalGeneration,
        "smolvlm": tf.SmolVLMForConditionalGeneration,
        "gemma3": tf.Gemma3ForConditionalGeneration,
        "llama": tf.LlamaForCausalLM,
        "qwen2": tf.Qwen2ForCausalLM,
    }
    config = _tiny_config(family)
    torch.manual_seed(seed)
    model = classes[family](config)
    model.set_attn_implementation("sdpa")
    return model.float().eval()


def _tokens_per_image(model, family: str) -> int:
    config = model.config
    if family == "llava":
        return (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    if family == "llava_next":  # base tile + a 1x2 grid of tiles + one newline per grid row
        side = config.vision_config.image_size // config.vision_config.patch_size
        return side * side + 2 * side * side + side
    if family in ("qwen2_vl", "qwen2_5_vl"):
        return _QWEN_GRID[1] * _QWEN_GRID[2] // config.vision_config.spatial_merge_size**2
    if family in ("idefics3", "smolvlm"):
        side = config.vision_config.image_size // config.vision_config.patch_size
        return side * side // config.scale_factor**2
    if family == "gemma3":
        return config.mm_tokens_per_image
    return 0


_QWEN_GRID = (1, 8, 8)  # (t, h, w) patches of one image
_IMAGES_PER_ROW = 2
_TEXT_RUNS = (30, 24, 12)  # text before, between and after the two images


def tiny_inputs(
    model, family: str, batch: int = 1, seed: int = 0, pads: list[int] | None = None
) -> dict:
    """``generate``/forward kwargs for :func:`tiny_model`: per row text, image, text, image,
    text (~100–170 tokens; text-only families: 96 text tokens), the image placeholders and the
    pixel inputs the family needs, and ``attention_mask``. ``pads[b]`` left-padding tokens in
    row ``b`` (rows are shortened by their padding, so all have the same padded length)."""
    gen = torch.Generator().manual_seed(seed)
    pads = [0] * batch if pads is None else [int(p) for p in pads]
    if len(pads) != batch:
        raise ValueError(f"pads must have one entry per row (batch={batch}), got pads={pads}")
    text_only = family in TEXT_ONLY
    runs = (sum(_TEXT_RUNS) + 30,) if text_only else _TEXT_RUNS
    if max(pads) >= runs[0]:
        raise ValueError(f"pads must be < {runs[0]}, got pads={pads}")
    n_images = 0 if text_only else _IMAGES_PER_ROW
    per_image = _tokens_per_image(model, family)
    framed = family in ("qwen2_vl", "qwen2_5_vl", "gemma3")  # <start> image tokens <end>
    rows, types = [], []
    for pad in pads:
        ids, kinds = [PAD_ID] * pad, [0] * pad
        for i, length in enumerate(runs):
            length -= pad if i == 0 else 0
            ids += torch.randint(*TEXT_IDS, (length,), generator=gen).tolist()
            kinds += [0] * length
            if i < n_images:
                ids += (
                    [VISION_START_ID] * framed + [IMAGE_ID] * per_image + [VISION_END_ID] * framed
                )
                kinds += [0] * framed + [1] * per_image + [0] * framed
        rows.append(ids)
        types.append(kinds)
    input_ids = torch.tensor(rows)
    mask = (torch.arange(input_ids.shape[1])[None, :] >= torch.tensor(pads)[:, None]).long()
    inputs = {"input_ids": input_ids, "attention_mask": mask}
    images = batch * n_images
    if family in ("llava", "gemma3"):
        size = model.config.vision_config.image_size
        inputs["pixel_values"] = torch.randn(images, 3, size, size, generator=gen)
    elif family == "llava_next":
        size = model.config.vision_config.image_size
        inputs["pixel_values"] = torch.randn(images, 3, 3, size, size, generator=gen)
        inputs["image_sizes"] = torch.tensor([[size, 2 * size]] * images)
    elif family in ("qwen2_vl", "qwen2_5_vl"):
        vision = model.config.vision_config
        t, h, w = _QWEN_GRID
        patch = 3 * vision.temporal_patch_size * vision.patch_size**2
        inputs["pixel_values"] = torch.randn(images * t * h * w, patch, generator=gen)
        inputs["image_grid_thw"] = torch.tensor([list(_QWEN_GRID)] * images)
        if "mm_token_type_ids" in inspect.signature(model.forward).parameters:
            inputs["mm_token_type_ids"] = torch.tensor(types)  # (transformers >= 5.3)
    elif family in ("idefics3", "smolvlm"):
        size = model.config.vision_config.image_size
        shape = (batch, n_images, 3, size, size)
        inputs["pixel_values"] = torch.randn(shape, generator=gen)
        inputs["pixel_attention_mask"] = torch.ones(shape[:2] + shape[3:], dtype=torch.bool)
    if family == "gemma3":
        inputs["token_type_ids"] = torch.tensor(types)
    return inputs
