"""The baselines: each ranks tokens by one score (:class:`~.base.ScoredPolicy`) and keeps the
same count as CSP."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .. import selection
from ..budget import Budget
from ..scoring import decomposed_scores
from .base import ScoredPolicy, _window_scores
from .prompt import Prompt


def _column_sums(prompt: Prompt, q: Tensor) -> Tensor:
    """Σ over the given queries of softmax attention per key: (batch, kv_heads, seq)."""
    scores = decomposed_scores(
        q, prompt.k, prompt.is_image, n=0.0, scale=prompt.scale, key_padding=prompt.key_padding
    )
    return scores.sum(dim=2)


@dataclass(frozen=True)
class H2O(ScoredPolicy):
    """Heavy hitters: attention received from all prompt queries (an O(L²) score, chunked)."""

    name: ClassVar[str] = "h2o"
    scores_every_query: ClassVar[bool] = True

    def score(self, prompt: Prompt) -> Tensor:
        return _column_sums(prompt, prompt.q)


@dataclass(frozen=True)
class SnapKV(ScoredPolicy):
    """Attention from the window queries, average-pooled over ``kernel_size`` positions."""

    name: ClassVar[str] = "snapkv"
    kernel_size: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        if (
            not isinstance(self.kernel_size, int)
            or self.kernel_size < 1
            or self.kernel_size % 2 == 0
        ):
            raise ValueError(
                f"kernel_size must be an odd int >= 1, got kernel_size={self.kernel_size!r}"
            )

    @property
    def window_n(self) -> float:
        return 0.0

    def score(self, prompt: Prompt) -> Tensor:
        sums = _window_scores(prompt, self.window_n).sum(dim=2)
        # Zero the window columns first so that pooling near each sequence's own window edge
        # sees zero padding, as pooling over [0, seq - W) alone would.
        sums = sums.masked_fill(~prompt.pool(), 0.0)
        flat = sums.reshape(-1, 1, prompt.seq)
        pooled = torch.nn.functional.avg_pool1d(
            flat, self.kernel_size, stride=1, padding=self.kernel_size // 2, count_include_pad=True
        )
        return pooled.view_as(sums)


@dataclass(frozen=True)
class LookM(H2O):
    """LOOK-M's text prior: H2O scores, with every text key ranked before any image key."""

    name: ClassVar[str] = "lookm"

    def _select(self, prompt: Prompt) -> Tensor:
        score, pool = self.score(prompt), prompt.pool()
        text_pool = pool & ~prompt.is_image[:, None]
        n_text = text_pool.sum(dim=-1, keepdim=True)
        quota = selection.counts([b.k for b in prompt.budgets], prompt.k.device)
        text = selection.top(score, torch.minimum(quota, n_text), text_pool)
        image = selection.top(
            score, quota - torch.minimum(quota, n_text), pool & prompt.is_image[:, None]
        )
        return selection.merge([text, image, prompt.recent()], prompt.seq)


@dataclass(frozen=True)
class StreamingLLM(ScoredPolicy):
    """The first ``sink_tokens`` real tokens plus the most recent ones, same total count."""

    name: ClassVar[str] = "streamingllm"
    sink_tokens: int = 4

    def budget_for(self, length: int) -> Budget:
        base = super().budget_for(length)
        total = base.k + base.recent
        sinks = min(self.sink_tokens, total)
        return Budget(length, sinks, base.window, total - sinks, sinks, sinks, 0, base.keep_all)

    def score(self, prompt: Prompt) -> Tensor:
        pos = torch.arange(prompt.seq, 0, -1, device=prompt.k.device, dtype=torch.float32)
        return pos.expand(prompt.k.shape[0], prompt.k.shape[1], -1)


@dataclass(frozen=True)
class RandomKeep(ScoredPolicy):
    """Uniformly random tokens (seeded) plus the recent window: a control."""

    name: ClassVar[str] = "random"
    seed: int = 0

    def score(self, prompt: Prompt) -> Tensor:
        gen = torch.Generator(device=prompt.k.device).manual_seed(self.seed)
        b, h, seq, _ = prompt.k.shape
        return torch.rand(b, h, seq, generator=gen, device=prompt.k.device)


@dataclass(frozen=True)
class KNorm(ScoredPolicy):
    """Keys with the smallest L2 norm (score = -||k_j||): a cheap, attention-free control."""

    name: ClassVar[str] = "knorm"

    def score(self, prompt: Prompt) -> Tensor:
        return -prompt.k.float().norm(dim=-1)
