"""What a policy selects from: :class:`Prompt` (one layer's validated prompt and each row's
budget), the :class:`ScoringWindow` a window scorer scores, and the :class:`Reconstruction`
a question-agnostic policy scores a prompt by."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .. import selection
from ..budget import Budget


class ScoringWindow(NamedTuple):
    """What a window scorer scores: ``mask`` (batch, W) bool, which of the last ``W`` queries
    count (each row's own window), and ``columns``, the keys before every row's always-kept
    recent tokens (the only ones ranked by score)."""

    mask: Tensor
    columns: int


class Prompt(NamedTuple):
    """One layer's validated prompt, with each sequence's padding and budget."""

    q: Tensor
    k: Tensor
    is_image: Tensor
    key_padding: Tensor | None
    scale: float
    pads: list[int]
    budgets: list[Budget]
    window_scores: Tensor | None = None  # decomposed window scores computed by the caller
    scores: Tensor | None = None  # (batch, kv_heads, seq) scores from the layer's own inputs

    @property
    def seq(self) -> int:
        return self.k.shape[2]

    def pool(self) -> Tensor:
        """(batch, 1, seq) bool: the positions ranked by score, ``[pad, seq - recent)``."""
        pos = torch.arange(self.seq, device=self.k.device)
        lo = selection.counts(self.pads, self.k.device)[:, 0]
        hi = selection.counts([self.seq - b.recent for b in self.budgets], self.k.device)[:, 0]
        return ((pos >= lo) & (pos < hi))[:, None, :]

    def real(self) -> Tensor:
        """(batch, kv_heads, longest row) long: every non-padding position, wherever the
        padding is (the keep-all selection)."""
        pos = torch.arange(self.seq, device=self.k.device).expand(self.k.shape[0], -1)
        if self.key_padding is not None:
            pos = pos.masked_fill(self.key_padding, -1)
        return selection.merge([pos[:, None].expand(-1, self.k.shape[1], -1)], self.seq)

    def recent(self) -> Tensor:
        """(batch, kv_heads, R) long: each sequence's always-kept last ``recent`` positions."""
        lengths = selection.counts([b.recent for b in self.budgets], self.k.device)
        return selection.span(self.seq - lengths, lengths, self.k.shape[1])

    def window(self) -> tuple[Tensor, Tensor]:
        """The scoring queries (batch, q_heads, W, head_dim) and the mask of those that count
        (batch, W), W being the longest window in the batch."""
        mask = window_mask(self.budgets, self.k.device)
        return self.q[:, :, self.seq - mask.shape[1] :], mask


class Reconstruction(NamedTuple):
    """How a question-agnostic policy scores a prompt: after the prefill the backend re-feeds
    the prompt (its own embeddings, images as the same visual embeddings), ``chunk`` tokens at
    a time after a separator, each chunk attending to the whole prompt and causally to itself,
    and scores each prompt token by the attention it receives from the re-fed tokens' queries
    (``queries``: ``"all"`` of them or the ``"text"`` ones), reduced over queries and the query
    heads of its KV head by ``reduce`` (``"max"`` or ``"sum"``), split self/cross by whether
    query and key share a modality. The scores reach :meth:`Policy.select` as its
    ``window_scores``."""

    chunk: int = 256
    reduce: str = "max"
    queries: str = "all"


def window_mask(budgets: list[Budget], device) -> Tensor:
    """(batch, W) bool, W the longest window: which of the last W queries are a row's own."""
    width = max(b.window for b in budgets)
    own = selection.counts([b.window for b in budgets], device)[:, 0]
    return torch.arange(width, device=device) >= width - own
