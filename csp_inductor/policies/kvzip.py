"""KVzip, the question-agnostic scorer of a re-read prompt, and Oracle, the upper bound that
keeps given positions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .base import REREAD_WINDOW, ScoredPolicy, _window_scores
from .prompt import Prompt, Reconstruction


@dataclass(frozen=True)
class KVzip(ScoredPolicy):
    """KVzip (Kim et al., NeurIPS 2025): question-agnostic, each prompt token scored by the
    most attention any query of a re-reading of the prompt gives it (:class:`Reconstruction`,
    ordinary softmax, no modality split). Ours keeps the same count in every KV head, as the
    other policies do (the paper also ranks heads jointly). Where no re-reading runs (a
    conversation turn) it ranks by the window's attention, the same way. Having no question
    to read, it keeps few recent tokens by default (``window_ratio``)."""

    name: ClassVar[str] = "kvzip"
    window_ratio: float = REREAD_WINDOW

    @property
    def window_n(self) -> float:
        return 0.0

    @property
    def reconstruction(self) -> Reconstruction:
        return Reconstruction()

    def score(self, prompt: Prompt) -> Tensor:
        scores = _window_scores(prompt, self.window_n)
        if prompt.window_scores is None:  # window columns: the most any window query gave
            return scores.sum(dim=2)
        return scores.amax(dim=2)


@dataclass(frozen=True)
class Oracle(ScoredPolicy):
    """An upper bound for benchmarks: keeps given prompt positions first (``positions[b]``,
    counted from row ``b``'s first real token: the evidence of every question to be asked),
    then the most recent tokens, within the same budget as every policy."""

    name: ClassVar[str] = "oracle"
    positions: tuple[tuple[int, ...], ...] = ()

    def score(self, prompt: Prompt) -> Tensor:
        b, heads, seq = prompt.k.shape[0], prompt.k.shape[1], prompt.seq
        if len(self.positions) != b:
            raise ValueError(
                f"Oracle needs the positions to keep for each of the batch's {b} rows, got "
                f"positions for {len(self.positions)}"
            )
        recency = torch.arange(1, seq + 1, device=prompt.k.device, dtype=torch.float32) / seq
        score = recency.expand(b, seq).clone()
        for row, (pad, keep) in enumerate(zip(prompt.pads, self.positions, strict=True)):
            real = seq - pad
            if any(not 0 <= p < real for p in keep):
                raise ValueError(
                    f"Oracle positions of row {row} must be in [0, {real}) (its real tokens), "
                    f"got {sorted(keep)}"
                )
            score[row, [pad + p for p in keep]] += 1.0
        return score[:, None].expand(-1, heads, -1)
