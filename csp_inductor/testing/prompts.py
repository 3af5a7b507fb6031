"""Random prompts: one layer's queries and keys with a modality layout and left padding."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class RandomPrompt:
    """One layer's worth of random prompt tensors (see :func:`random_prompt`)."""

    q: Tensor  # (batch, q_heads, seq, head_dim)
    k: Tensor  # (batch, kv_heads, seq, head_dim)
    is_image: Tensor  # (batch, seq) bool
    key_padding: Tensor | None  # (batch, seq) bool, left padding


LAYOUTS = ("mixed", "text", "image", "blocks")


def random_prompt(
    batch: int = 1,
    q_heads: int = 4,
    kv_heads: int = 2,
    seq: int = 64,
    head_dim: int = 16,
    *,
    pads: list[int] | None = None,
    layout: str = "blocks",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> RandomPrompt:
    """Random queries/keys with a modality layout:

    ``"text"`` / ``"image"``: one modality only; ``"mixed"``: each token independently;
    ``"blocks"``: runs of image tokens between text, as interleaved multi-image prompts have.
    ``pads[b]`` left-padding positions in row ``b`` (None = no padding).
    """
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_heads, seq, head_dim, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, seq, head_dim, generator=gen, dtype=torch.float64)
    # a few strongly attended keys so scores are spread out, as in real attention
    k[:, :, torch.randint(seq, (max(1, seq // 8),), generator=gen)] *= 3
    if layout == "text":
        is_image = torch.zeros(batch, seq, dtype=torch.bool)
    elif layout == "image":
        is_image = torch.ones(batch, seq, dtype=torch.bool)
    elif layout == "mixed":
        is_image = torch.rand(batch, seq, generator=gen) < 0.5
    elif layout == "blocks":
        period = max(2, seq // 5)
        is_image = ((torch.arange(seq) % period) < period * 2 // 3).expand(batch, seq).clone()
    else:
        raise ValueError(f"layout must be one of {LAYOUTS}, got layout={layout!r}")
    key_padding = None
    if pads is not None:
        key_padding = torch.arange(seq)[None, :] < torch.tensor(pads)[:, None]
    dev = torch.device(device)
    return RandomPrompt(
        q.to(dtype).to(dev),
        k.to(dtype).to(dev),
        is_image.to(dev),
        None if key_padding is None else key_padding.to(dev),
    )
