"""Cross-Self Pruning: each window query's attention split by whether query and key share a
modality, and the self and cross quotas filled from the two scores (CSP_SPEC.md)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from typing import ClassVar

import torch
from torch import Tensor

from .. import selection
from ..budget import Budget, split_budget
from .base import (
    REREAD_WINDOW,
    SCORINGS,
    Policy,
    _all_kept,
    _check_layers,
    _check_range,
    _real,
    _window_scores,
)
from .prompt import Prompt, Reconstruction

# the most window queries that score a prompt by default (README, "The scoring window")
QUERY_WINDOW = 64


@dataclass(frozen=True)
class CSP(Policy):
    """Cross-Self Pruning (CSP_SPEC.md).

    Args:
        budget: kept fraction of the prompt, in (0, 1].
        window_ratio: scoring window and always-kept recent tokens, as a fraction of the
            prompt, in (0, budget]; default 0.1, or ``REREAD_WINDOW`` (recent tokens only)
            with ``scoring="reconstruct"``.
        query_window: at most this many of the window's queries score the prompt, the last
            ones (the recent tokens kept stay ``int(L * window_ratio)``); default
            ``QUERY_WINDOW`` (64), chosen by measurement (README, "The scoring window"), or no
            cap with ``faithful=True``; 0: no cap, the paper's ``int(L * window_ratio)``.
        cross_ratio: share of the score-ranked tokens chosen by the cross-modality score.
        n: the n-softmax parameter used for ranking (0 = ordinary softmax).
        sink_tokens: first real tokens always kept, taken out of the self quota.
        faithful: reproduce the authors' selection quirks (duplicates, cross_ratio <= 0
            meaning quotas (1, 308)).
        recent_bias: the authors' ``kv_recent_bias``: recent kept = int(W * recent_bias).
        scoring: ``"window"`` (the paper: the prompt's last queries score it, so the question,
            at the prompt's end, steers what is kept) or ``"reconstruct"`` (question-agnostic:
            the queries of a re-reading of the prompt score it, :class:`Reconstruction`; a
            conversation turn is still scored by its window).
        layers: how the budget is shared among the layers (keyword only): ``"uniform"``
            (the same count in every layer), ``"pyramid"`` (PyramidKV: the score-ranked
            tokens from ``2 - 1/20`` times the mean in the first layer down to ``1/20`` of it
            in the last) or ``"adaptive"`` (after VL-Cache: in proportion to how spread each
            layer's window attention is, :mod:`csp_inductor.allocation`). Every layer keeps the
            recent tokens, and the layers together keep what ``"uniform"`` keeps; each
            layer's cache holds its own count.
    """

    name: ClassVar[str] = "csp"
    budget: float = 0.2
    window_ratio: float | None = None
    cross_ratio: float = 0.5
    n: float = 1.0
    sink_tokens: int = 0
    faithful: bool = False
    recent_bias: float = 1.0
    scoring: str = "window"
    query_window: int | None = None
    layers: str = field(default="uniform", kw_only=True)

    def __post_init__(self) -> None:
        if self.scoring not in SCORINGS:
            raise ValueError(f"scoring must be one of {SCORINGS}, got scoring={self.scoring!r}")
        if self.window_ratio is None:
            default = 0.1 if self.scoring == "window" else REREAD_WINDOW
            object.__setattr__(self, "window_ratio", default)
        _check_range("budget", self.budget, 0.0, 1.0, lo_open=True)
        _check_range("window_ratio", self.window_ratio, 0.0, self.budget, lo_open=True)
        _check_range("cross_ratio", self.cross_ratio, 0.0, 1.0)
        _check_range("recent_bias", self.recent_bias, 0.0, 1.0)
        if not (_real(self.n) and self.n >= 0):
            raise ValueError(f"n must be a finite number >= 0, got n={self.n!r}")
        if not isinstance(self.sink_tokens, int) or self.sink_tokens < 0:
            raise ValueError(
                f"sink_tokens must be an int >= 0, got sink_tokens={self.sink_tokens!r}"
            )
        _check_layers(self)
        if self.query_window is None:
            object.__setattr__(self, "query_window", 0 if self.faithful else QUERY_WINDOW)
        if (
            not isinstance(self.query_window, int)
            or isinstance(self.query_window, bool)
            or (self.query_window < 0)
        ):
            raise ValueError(
                f"query_window must be an int >= 0 (0: no cap) or None (the default), got "
                f"query_window={self.query_window!r}"
            )
        if self.faithful and self.query_window:
            raise ValueError(
                f"faithful=True reproduces the authors' code, which scores with all "
                f"int(L * window_ratio) window queries; got query_window={self.query_window}"
            )
        if self.faithful and self.layers != "uniform":
            raise ValueError(
                f"faithful=True reproduces the authors' code, which keeps the same count in "
                f"every layer; got layers={self.layers!r}"
            )
        if self.faithful and self.sink_tokens:
            raise ValueError(
                f"faithful=True reproduces the authors' code, which has no sink tokens; "
                f"got sink_tokens={self.sink_tokens}"
            )

    @classmethod
    def from_authors(
        cls,
        hh_ratio: float = 0.1,
        recent_ratio: float = 0.1,
        cross_ratio: float = 0.5,
        kv_recent_bias: float = 1.0,
        n: float = 1.0,
        faithful: bool = True,
    ) -> CSP:
        """The authors' parametrisation (``hh_ratio + recent_ratio`` is our budget)."""
        return cls(
            budget=round(hh_ratio + recent_ratio, 12),
            window_ratio=recent_ratio,
            cross_ratio=cross_ratio,
            n=n,
            faithful=faithful,
            recent_bias=kv_recent_bias,
        )

    def budget_for(self, length: int) -> Budget:
        return split_budget(
            length, self.budget, self.window_ratio, self.cross_ratio, self.recent_bias,
            self.faithful, self.query_window,
        )  # fmt: skip

    def _ranked(self, budget: Budget, k: int) -> Budget:
        k_cross = int(k * self.cross_ratio)
        return replace(
            budget, hh=k, k=k, k_self=k - k_cross, k_cross=k_cross, keep_all=_all_kept(budget, k)
        )

    def quotas(self, prompt: Prompt) -> list[tuple[int, int]]:
        """(k_self, k_cross) per sequence; a sequence without image tokens puts its whole
        score-ranked budget on the (text-only) self score, and says so."""
        out = []
        has_image = (prompt.is_image & ~_pad(prompt)).any(dim=1).tolist()
        for bud, img in zip(prompt.budgets, has_image, strict=True):
            if img or self.faithful or bud.keep_all:
                out.append((bud.k_self, bud.k_cross))
            else:
                warnings.warn(
                    "CSP: a prompt has no image tokens; scoring is text-only (the cross "
                    "quota goes to the self score)",
                    stacklevel=4,
                )
                out.append((bud.k_self + bud.k_cross, 0))
        return out

    @property
    def window_n(self) -> float:
        return self.n

    @property
    def reconstruction(self) -> Reconstruction | None:
        return Reconstruction() if self.scoring == "reconstruct" else None

    def _select(self, prompt: Prompt) -> Tensor:
        s_self, s_cross = _window_scores(prompt, self.window_n).unbind(dim=2)
        dev, seq, heads = prompt.k.device, prompt.seq, prompt.k.shape[1]
        quotas = self.quotas(prompt)
        k_self = selection.counts([q[0] for q in quotas], dev)
        k_cross = selection.counts([q[1] for q in quotas], dev)
        pool = prompt.pool()
        if self.faithful:
            chosen_self = selection.top(s_self, k_self, pool)
            chosen_cross = selection.top(s_cross, k_cross, pool)
            return selection.merge([chosen_self, chosen_cross, prompt.recent()], seq)
        n_sink = selection.counts([min(self.sink_tokens, q[0]) for q in quotas], dev)
        sinks = selection.span(selection.counts(prompt.pads, dev), n_sink, heads)
        pool = pool & ~selection.as_mask(sinks[:, :1], seq)
        chosen_self = selection.top(s_self, k_self - n_sink, pool)
        pool = pool & ~selection.as_mask(chosen_self, seq)
        chosen_cross = selection.top(s_cross, k_cross, pool)
        return selection.merge([sinks, chosen_self, chosen_cross, prompt.recent()], seq)


def _pad(prompt: Prompt) -> Tensor:
    if prompt.key_padding is None:
        return torch.zeros_like(prompt.is_image)
    return prompt.key_padding
