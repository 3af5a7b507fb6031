"""The long-context configuration of the profiler and the benchmarks: a random-weight LLaVA
whose language model is big enough that attention matters, and image-heavy prompts for it."""

from __future__ import annotations

import torch


def long_context_llava(
    hidden: int = 1024,
    layers: int = 8,
    heads: int = 16,
    kv_heads: int = 4,
    intermediate: int | None = None,
    vocab: int = 32000,
    max_positions: int = 65536,
    seed: int = 0,
):
    """A random-weight LLaVA whose language model is big enough that attention matters at long
    context (Llama decoder, GQA), with a tiny one-layer CLIP tower (its cost is not the point):
    fp32, eval, sdpa. Image placeholders are token ``vocab - 1``; 576 tokens per image."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    from transformers import LlavaForConditionalGeneration as Llava

    vision = CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
        image_size=336, patch_size=14, projection_dim=64,
    )  # fmt: skip
    text = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate or 11 * hidden // 4,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions, rope_parameters={"rope_type": "default",
        "rope_theta": 500000.0},
    )  # fmt: skip
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=vocab - 1,
        vision_feature_select_strategy="default", vision_feature_layer=-1,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = Llava(config)
    model.set_attn_implementation("sdpa")
    return model.float().eval()


TOKENS_PER_IMAGE = (336 // 14) ** 2


def image_heavy_prompt(model, context: int, image_share: float = 0.85, seed: int = 0) -> dict:
    """``generate`` kwargs for a ``context``-token prompt of :func:`long_context_llava`: as many
    576-token images as fit in ``image_share`` of it, separated by text runs."""
    gen = torch.Generator().manual_seed(seed)
    image_id = model.config.image_token_id
    images = max(1, int(context * image_share) // TOKENS_PER_IMAGE)
    text = context - images * TOKENS_PER_IMAGE
    if text < images + 1:
        raise ValueError(f"context={context} is too short for {images} images plus text")
    runs = [text // (images + 1)] * (images + 1)
    runs[-1] += text - sum(runs)
    parts = []
    for i, n in enumerate(runs):
        if i:
            parts.append(torch.full((TOKENS_PER_IMAGE,), image_id))
        parts.append(torch.randint(3, image_id - 1, (n,), generator=gen))
    ids = torch.cat(parts)[None]
    size = model.config.vision_config.image_size
    pixels = torch.randn(images, 3, size, size, generator=gen)
    return dict(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids))
