"""The policy interface: :class:`Policy` (validation, per-sequence budgets, the keep-all path,
rows padded anywhere), :class:`Prompt`, :class:`ScoredPolicy` and :class:`Full`.

``policy.select(q, k, is_image, key_padding=None, *, scale=None)`` takes one layer's prompt
queries and keys and returns the kept prompt positions per KV head::

    q           (batch, q_heads, seq, head_dim)   all prompt queries, RoPE applied
    k           (batch, kv_heads, seq, head_dim)
    is_image    (batch, seq) bool                 True for visual tokens
    key_padding (batch, seq) bool or None         True = padding (anywhere); never kept
    returns     (batch, kv_heads, K) long         ascending positions, -1 padded at the end

Each sequence gets its own budget from its own unpadded length. A baseline only writes
``score()``; :class:`ScoredPolicy` turns scores into the top ``k`` plus the recent window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import ClassVar

import torch
from torch import Tensor

from .. import selection
from ..allocation import MAX_SHARE, allocate, pyramid_weights
from ..budget import Budget, split_budget
from ..labels import SCORING, label
from ..scoring import decomposed_scores
from .prompt import Prompt, Reconstruction, ScoringWindow, window_mask

SCORINGS = ("window", "reconstruct")
# the recent tokens a question-agnostic policy keeps by default (a fraction of the prompt): it
# has no question at the prompt's end to keep close (measured: README, conversations)
REREAD_WINDOW = 0.01
# how a policy shares its budget among the layers (``layers=``, :mod:`csp_inductor.allocation`):
# the same count in every layer; PyramidKV's, more in the first layers and less in the last; or
# by each layer's attention density (after VL-Cache)
LAYER_RULES = ("uniform", "pyramid", "adaptive")


def _keep_all_as_recent(budget: Budget) -> Budget:
    # A sequence that keeps everything is, for batched selection, one whose recent window is
    # the whole prompt and whose quotas are zero.
    if not budget.keep_all:
        return budget
    n = budget.length
    return Budget(n, hh=0, window=0, recent=n, k=0, k_self=0, k_cross=0, keep_all=True)


def _all_kept(budget: Budget, k: int) -> bool:
    """Whether ``k`` ranked tokens beside ``budget``'s recent ones are the whole sequence."""
    return budget.recent + k >= budget.length


def _check_layers(policy: Policy) -> None:
    """The ``layers`` option: a rule of :data:`LAYER_RULES`; ``"adaptive"`` needs the window
    (or re-read) scores a layer's density is read from."""
    if policy.layers not in LAYER_RULES:
        raise ValueError(f"layers must be one of {LAYER_RULES}, got layers={policy.layers!r}")
    if policy.layers == "adaptive" and policy.window_n is None:
        raise ValueError(
            f"layers='adaptive' reads each layer's attention density from the window scores "
            f"a policy ranks with; {type(policy).__name__} ranks by other scores; supported: "
            "CSP, SnapKV and KVzip"
        )


def _real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_range(name: str, value: object, lo: float, hi: float, lo_open: bool = False) -> None:
    ok = _real(value) and (lo < value if lo_open else lo <= value) and value <= hi
    if not ok:
        bracket = "(" if lo_open else "["
        raise ValueError(f"{name} must be a number in {bracket}{lo}, {hi}], got {name}={value!r}")


@dataclass(frozen=True)
class Policy:
    """Base of all policies: input validation, per-sequence budgets, the keep-all path."""

    name: ClassVar[str]
    scores_every_query: ClassVar[bool] = False  # ranks with all prompt queries (H2O)
    # ranks with scores computed from the attention layer's own inputs (its module, hidden
    # states, position embeddings), which the backend passes to select() as ``scores``
    needs_layer_inputs: ClassVar[bool] = False

    def budget_for(self, length: int) -> Budget:
        """The budget of one sequence with ``length`` real prompt tokens."""
        raise NotImplementedError

    @property
    def layer_rule(self) -> str:
        """How the budget is shared among the layers (:data:`LAYER_RULES`; the ``layers``
        option of the policies that take it, else ``"uniform"``)."""
        return getattr(self, "layers", "uniform")

    def layer_counts(
        self, length: int, layers: int, density: list[float] | None = None
    ) -> list[int]:
        """Kept tokens of a ``length``-token sequence in each of ``layers`` layers. Every layer
        keeps the recent tokens of :meth:`budget_for`; its score-ranked tokens, ``layers · k``
        in all, are shared out by :attr:`layer_rule` (``"adaptive"``: in proportion to each
        layer's ``density``, :func:`~csp_inductor.allocation.attention_density`), none above
        the tokens there are to rank or :data:`~csp_inductor.allocation.MAX_SHARE` times
        ``k``, so the layers keep what a uniform policy keeps in total."""
        budget = self.budget_for(length)
        if self.layer_rule == "uniform" or budget.keep_all:
            return [budget.kept] * layers
        if self.layer_rule == "pyramid":
            weights = self.layer_weights(layers)
        elif density is None or len(density) != layers:
            raise ValueError(
                f"layers='adaptive' shares the budget by the layers' attention densities: "
                f"give one per layer ({layers}), got density={density}"
            )
        else:
            weights = list(density)
        ranked = allocate(budget.k * layers, weights, self._most_ranked(budget))
        return [budget.recent + k for k in ranked]

    def layer_weights(self, layers: int) -> list[float]:
        """The ``"pyramid"`` rule's shares of ``layers`` layers (PyramidKV's, beta 20)."""
        return pyramid_weights(layers)

    def prefill_count(self, length: int) -> int:
        """What every layer keeps at the prefill of a ``length``-token sequence when its
        count is known only afterwards (``layers="adaptive"``): the most a layer can keep,
        trimmed to its own count once every layer's density is known."""
        budget = self.budget_for(length)
        return budget.kept if budget.keep_all else budget.recent + self._most_ranked(budget)

    @staticmethod
    def _most_ranked(budget: Budget) -> int:
        return min(budget.length - budget.recent, MAX_SHARE * budget.k)

    def budget_kept(self, length: int, kept: int) -> Budget:
        """The budget of a ``length``-token sequence in a layer that keeps ``kept`` tokens
        (:meth:`layer_counts`): :meth:`budget_for`'s recent tokens, the rest ranked."""
        budget = self.budget_for(length)
        if kept == budget.kept:
            return budget
        k = kept - budget.recent
        if budget.keep_all or not 0 <= k <= length - budget.recent:
            raise ValueError(
                f"{self!r} keeps {budget.kept} of {length} tokens ({budget.recent} recent); a "
                f"layer cannot keep kept={kept} of them"
            )
        return self._ranked(budget, k)

    def _ranked(self, budget: Budget, k: int) -> Budget:
        """``budget`` with ``k`` score-ranked tokens (a single quota)."""
        return replace(budget, hh=k, k=k, k_self=k, k_cross=0, keep_all=_all_kept(budget, k))

    @property
    def reconstruction(self) -> Reconstruction | None:
        """How the prompt is re-read to score it, for a question-agnostic policy (the backend
        then prefills keeping everything, re-reads, and prunes); None: scored at prefill."""
        return None

    @property
    def window_n(self) -> float | None:
        """The n-softmax parameter of the decomposed window scores this policy ranks with
        (:func:`~csp_inductor.scoring.decomposed_scores` of :meth:`Prompt.window`'s queries),
        or None when it ranks by anything else."""
        return None

    def scoring_window(self, seq: int, key_padding: Tensor | None) -> ScoringWindow | None:
        """The window queries and keys :meth:`select` would score a ``seq``-token prompt with,
        when their scores may be passed in as ``window_scores`` (a window scorer, some row
        pruned, every row left-padded or unpadded); else None."""
        if self.window_n is None or _packing(key_padding) is not None:
            return None
        _, budgets = self._budgets(seq, key_padding, batch=1)
        if all(b.keep_all for b in budgets):
            return None
        device = None if key_padding is None else key_padding.device
        recent = min(b.recent for b in budgets if not b.keep_all)
        return ScoringWindow(window_mask(budgets, device), seq - recent)

    def select(
        self,
        q: Tensor,
        k: Tensor,
        is_image: Tensor,
        key_padding: Tensor | None = None,
        *,
        scale: float | None = None,
        window_scores: Tensor | None = None,
        scores: Tensor | None = None,
        kept: list[int] | None = None,
    ) -> Tensor:
        """Kept prompt positions per KV head (see the module docstring for shapes).

        ``window_scores`` (batch, kv_heads, 2, seq): the scores of the last
        :meth:`scoring_window` queries with :attr:`window_n`, when the caller computed them
        already (the prefill does, from its attention kernel's log-sum-exp). ``scores``
        (batch, kv_heads, seq): what a policy that :attr:`needs_layer_inputs` ranks by.
        ``kept``: each row's kept count in this layer, when the layers keep different counts
        (:meth:`layer_counts`; None: :meth:`budget_for`'s)."""
        prompt = self._prompt(q, k, is_image, key_padding, scale, kept)
        if all(b.keep_all for b in prompt.budgets):
            return prompt.real()
        order = _packing(key_padding)
        if (scores is not None) != self.needs_layer_inputs:
            raise ValueError(
                f"scores are given to, and only to, policies that rank by the layer's inputs "
                f"(needs_layer_inputs); {self!r} "
                + ("does not use them" if scores is not None else "needs them")
            )
        if scores is not None:
            b, heads, seq = k.shape[0], k.shape[1], k.shape[2]
            if tuple(scores.shape) != (b, heads, seq):
                raise ValueError(
                    f"scores must be (batch, kv_heads, seq) = {(b, heads, seq)}, got "
                    f"shape={tuple(scores.shape)}"
                )
            prompt = prompt._replace(scores=scores)
        if window_scores is not None:
            if order is not None or self.window_n is None:
                raise ValueError(
                    f"window_scores apply to window scorers (window_n is not None) on left-padded "
                    f"or unpadded prompts; got them for {self!r}"
                    + (" with rows padded elsewhere" if order is not None else "")
                )
            b, heads, seq = k.shape[0], k.shape[1], k.shape[2]
            if tuple(window_scores.shape) != (b, heads, 2, seq):
                raise ValueError(
                    f"window_scores must be (batch, kv_heads, 2, seq) = {(b, heads, 2, seq)}, "
                    f"got shape={tuple(window_scores.shape)}"
                )
            prompt = prompt._replace(window_scores=window_scores)
        if order is None:
            return self._select(prompt)
        # rows padded on the right or inside are packed into left-padded ones, selected, and
        # the kept positions mapped back (ascending still: real tokens keep their order)
        packed = prompt._replace(
            q=_permute(q, order, dim=2),
            k=_permute(k, order, dim=2),
            is_image=_permute(is_image, order, dim=1),
            key_padding=_permute(key_padding, order, dim=1),
            scores=None if scores is None else _permute(scores, order, dim=2),
        )
        idx = self._select(packed)
        back = order[:, None, :].expand(-1, idx.shape[1], -1).gather(2, idx.clamp_min(0))
        return back.masked_fill(idx < 0, -1)

    def window_scores(
        self, q: Tensor, k: Tensor, is_image: Tensor, key_padding: Tensor | None, scale=None
    ) -> Tensor:
        """(batch, kv_heads, 2, seq) fp32: the decomposed scores of the window queries this
        policy (a window scorer) ranks a prompt by, what ``select`` takes as ``window_scores``."""
        if self.window_n is None:
            raise ValueError(f"{self!r} ranks by no window scores")
        return _window_scores(self._prompt(q, k, is_image, key_padding, scale), self.window_n)

    def prepare(self, model) -> None:
        """Called with the model before each prompt a policy that :attr:`needs_layer_inputs`
        scores."""

    def layer_scores(self, module, inputs: dict, key: Tensor, value: Tensor) -> Tensor:
        """For a policy that :attr:`needs_layer_inputs`: the (batch, kv_heads, seq) scores of
        one attention layer's prompt, from its module, its forward's arguments by name
        (``hidden_states``, ``position_embeddings``, …) and its keys and values."""
        raise NotImplementedError

    def _select(self, prompt: Prompt) -> Tensor:
        raise NotImplementedError

    def _budgets(
        self, seq: int, key_padding: Tensor | None, batch: int, kept: list[int] | None = None
    ) -> tuple[list[int], list[Budget]]:
        """Each row's padding and budget (``batch`` rows of no padding without a mask), of
        ``kept[b]`` tokens when given."""
        pads = [0] * batch if key_padding is None else key_padding.sum(dim=1).tolist()
        if kept is None:
            budgets = [self.budget_for(seq - p) for p in pads]
        else:
            budgets = [self.budget_kept(seq - p, n) for p, n in zip(pads, kept, strict=True)]
        return pads, [_keep_all_as_recent(b) for b in budgets]

    def _prompt(self, q, k, is_image, key_padding, scale, kept=None) -> Prompt:
        if q.dim() != 4 or k.dim() != 4 or q.shape[2] != k.shape[2]:
            raise ValueError(
                "q must be (batch, q_heads, seq, head_dim) and k (batch, kv_heads, seq, head_dim) "
                f"with the same seq, got q.shape={tuple(q.shape)}, k.shape={tuple(k.shape)}"
            )
        b, _, seq, d = q.shape
        for mask_name, mask in (("is_image", is_image), ("key_padding", key_padding)):
            if mask is not None and (tuple(mask.shape) != (b, seq) or mask.dtype != torch.bool):
                raise ValueError(
                    f"{mask_name} must be a bool tensor of shape (batch, seq) = {(b, seq)}, got "
                    f"shape={tuple(mask.shape)} dtype={mask.dtype}"
                )
        pads, budgets = self._budgets(seq, key_padding, b, kept)
        scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
        return Prompt(q, k, is_image, key_padding, scale, pads, budgets)


@dataclass(frozen=True)
class Full(Policy):
    """Keep every prompt token (the unpruned cache)."""

    name: ClassVar[str] = "full"

    def budget_for(self, length: int) -> Budget:
        return Budget(
            length, hh=0, window=0, recent=length, k=0, k_self=0, k_cross=0, keep_all=True
        )


def _packing(key_padding: Tensor | None) -> Tensor | None:
    """(batch, seq) long: each row's order with its padding moved first and its real tokens
    after it, in their order (a stable sort); None when every row is left-padded already.
    Right padding, or padding between real tokens (a conversation turn padded in the middle of
    the sequence), is selected in this packed order and mapped back."""
    if key_padding is None or not bool((key_padding[:, 1:] & ~key_padding[:, :-1]).any()):
        return None
    return torch.sort((~key_padding).to(torch.int8), dim=1, stable=True).indices


def _permute(x: Tensor, order: Tensor, dim: int) -> Tensor:
    """``x`` reordered along ``dim`` by ``order`` (batch, seq): ``x[b, order[b, j]]`` at j."""
    shape = [x.shape[0]] + [1] * (x.dim() - 1)
    shape[dim] = x.shape[dim]
    return x.gather(dim, order.view(shape).expand(x.shape))


@dataclass(frozen=True)
class ScoredPolicy(Policy):
    """A baseline that ranks tokens by one score: keep the top ``k`` of ``[pad, seq - W)`` plus
    the last ``W`` tokens, with ``k = int(L·(budget − window_ratio))`` and
    ``W = int(L·window_ratio)`` as for CSP, so every policy keeps the same count; ``layers``
    shares it among the layers as for :class:`~csp_inductor.policies.CSP`."""

    budget: float = 0.2
    window_ratio: float = 0.1
    layers: str = field(default="uniform", kw_only=True)

    def __post_init__(self) -> None:
        _check_range("budget", self.budget, 0.0, 1.0, lo_open=True)
        _check_range("window_ratio", self.window_ratio, 0.0, self.budget, lo_open=True)
        _check_layers(self)

    def budget_for(self, length: int) -> Budget:
        # one ranked quota: all of k is the "self" share
        return split_budget(length, self.budget, self.window_ratio, cross_ratio=0.0)

    def score(self, prompt: Prompt) -> Tensor:
        """(batch, kv_heads, seq) float, higher = keep."""
        raise NotImplementedError

    def _select(self, prompt: Prompt) -> Tensor:
        quota = selection.counts([b.k for b in prompt.budgets], prompt.k.device)
        chosen = selection.top(self.score(prompt), quota, prompt.pool())
        return selection.merge([chosen, prompt.recent()], prompt.seq)


def _window_scores(prompt: Prompt, n: float) -> Tensor:
    """The decomposed scores of the prompt's window queries: given, or computed here."""
    if prompt.window_scores is not None:
        return prompt.window_scores
    q_window, mask = prompt.window()
    with label(SCORING):
        return decomposed_scores(
            q_window, prompt.k, prompt.is_image, n=n, scale=prompt.scale,
            key_padding=prompt.key_padding, window_mask=mask,
        )  # fmt: skip
