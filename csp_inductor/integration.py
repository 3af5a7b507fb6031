"""transformers integration: one small adapter per model family, and the attention function.

An adapter says where the language model's decoder is and how a prompt marks its visual
tokens. Everything else (the attention function, the cache, the hooks) is shared.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .attention import decode_attention, prefill_attention
from .profiling import label


@dataclass(frozen=True)
class Adapter:
    """How one model family is wired.

    ``decoder``: attribute path from the top-level model to the text decoder (the module with
    ``.layers``). ``image_token_attrs``: config attributes holding the ids of visual
    placeholder tokens (image and video). ``token_types``: the model's forward takes
    ``mm_token_type_ids`` (0 text, 1 image, 2 video), a ready modality tensor.
    ``bidirectional_images``: the model lets the tokens of one image attend to each other
    during prefill.
    """

    decoder: str
    image_token_attrs: tuple[str, ...] = ()
    token_types: bool = False
    bidirectional_images: bool = False

    @property
    def multimodal(self) -> bool:
        return bool(self.image_token_attrs)


ADAPTERS: dict[str, Adapter] = {
    "llava": Adapter("model.language_model", ("image_token_id",)),
    "llava_next": Adapter("model.language_model", ("image_token_id",)),
    "qwen2_vl": Adapter(
        "model.language_model", ("image_token_id", "video_token_id"), token_types=True
    ),
    "qwen2_5_vl": Adapter(
        "model.language_model", ("image_token_id", "video_token_id"), token_types=True
    ),
    "idefics3": Adapter("model.text_model", ("image_token_id",)),
    "smolvlm": Adapter("model.text_model", ("image_token_id",)),
    "gemma3": Adapter("model.language_model", ("image_token_id",), bidirectional_images=True),
    "llama": Adapter("model"),
    "qwen2": Adapter("model"),
}


def adapter_for(model: nn.Module) -> Adapter:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        raise TypeError(
            f"csp_inductor has no adapter for model_type={model_type!r} "
            f"({type(model).__name__}); supported families: {sorted(ADAPTERS)}"
        )
    return ADAPTERS[model_type]


def find_decoder(model: nn.Module, adapter: Adapter) -> nn.Module:
    module = model
    for name in adapter.decoder.split("."):
        module = getattr(module, name, None)
        if module is None:
            raise TypeError(
                f"{type(model).__name__} has no {adapter.decoder!r}; is it a generation model "
                f"of family {model.config.model_type!r}?"
            )
    return module


def image_token_ids(model: nn.Module, adapter: Adapter) -> list[int]:
    return [
        int(getattr(model.config, attr))
        for attr in adapter.image_token_attrs
        if getattr(model.config, attr, None) is not None
    ]


def modality(
    adapter: Adapter, token_ids: list[int], input_ids: Tensor | None, token_types: Tensor | None
) -> Tensor | None:
    """(batch, seq) bool, True for visual tokens; None when it cannot be known."""
    if adapter.token_types and token_types is not None:
        return token_types > 0
    if input_ids is None:
        return None
    is_image = torch.zeros_like(input_ids, dtype=torch.bool)
    for token in token_ids:
        is_image |= input_ids == token
    return is_image


def image_blocks(is_image: Tensor) -> Tensor:
    """(batch, seq) long: the index of the image (run of visual tokens) each token is in, -1
    for text. Tokens of one image attend to each other when ``bidirectional_images``."""
    previous = torch.nn.functional.pad(is_image, (1, 0), value=False)[:, :-1]
    starts = is_image & ~previous
    return torch.where(is_image, starts.long().cumsum(dim=1) - 1, -1)


def csp_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[Tensor, None]:
    """The function registered with transformers' ``AttentionInterface``.

    query (b, hq, t, d); key/value (b, hkv, t or capacity, d) as the cache returned them.
    Returns (b, t, hq, d) and no attention weights.
    """
    backend = module.csp_backend
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    window = getattr(module, "sliding_window", None)
    cache = backend.active
    if cache is None or cache.phase == "prefill":
        with label("csp::prefill_attention"):
            out = prefill_attention(
                query, key, value, scale=scale, key_padding=backend.key_padding,
                sliding_window=window, kernel=backend.kernel, image_blocks=backend.image_blocks,
            )  # fmt: skip
        if cache is not None:
            layer = cache.layers[module.layer_idx]
            torch.ops.csp_inductor.compact_(
                query, key, value, backend.is_image, backend.key_padding, layer.keys,
                layer.values, layer.positions, cache.lengths, backend.policy_index, scale,
            )  # fmt: skip
        return out, None
    layer = cache.layers[module.layer_idx]
    with label("csp::decode_attention"):
        out = decode_attention(
            query, key, value, lengths=cache.lengths, positions=layer.positions, seen=cache.seen,
            scale=scale, sliding_window=window, kernel=backend.kernel,
            block_mask=backend.block_masks.get(module.layer_idx if window else None),
            null_logit=backend.null_logit,
        )  # fmt: skip
    return out, None
