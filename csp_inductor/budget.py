"""Budget arithmetic: how many prompt tokens each part of a pruning policy keeps.

All counts are Python ints derived from the (unpadded) prompt length ``L`` of one sequence.
The formulas are those of CSP_SPEC.md ("Budget arithmetic"); the baselines share the same
split into a score-ranked part ``k`` and an always-kept recent window ``R``.
"""

from __future__ import annotations

from dataclasses import dataclass

# The authors' debug leftover: cross_ratio <= 0 forces these quotas whatever L is.
AUTHORS_ZERO_CROSS_QUOTAS = (1, 308)  # (k_cross, k_self)


@dataclass(frozen=True)
class Budget:
    """Token counts for one sequence of ``length`` real (non-padding) prompt tokens.

    ``keep_all`` is True when nothing is pruned: the budget is the whole prompt, the prompt is
    too short for a single window token (``int(length * window_ratio) == 0``), or there are
    fewer candidate tokens than quotas (``length - recent < k_self + k_cross``, which covers
    the spec's ``length < hh + window``). Then all ``length`` tokens are kept.
    """

    length: int
    hh: int  # heavy-hitter budget (score-ranked tokens, before the recent-bias correction)
    window: int  # W: number of scoring queries, the last W prompt tokens
    recent: int  # R: the last R prompt tokens, always kept
    k: int  # tokens chosen by score from positions [0, length - recent)
    k_self: int
    k_cross: int
    keep_all: bool

    @property
    def kept(self) -> int:
        """Number of kept tokens (counting a token chosen twice twice, as the authors do)."""
        if self.keep_all:
            return self.length
        return self.k_self + self.k_cross + self.recent


def _frac(x: float) -> float:
    # budget - window_ratio in floating point leaves tails such as 0.30000000000000004 that
    # would make int(L * x) differ from the authors' int(L * 0.3); 12 digits is far below
    # any ratio a user writes and far above the float noise.
    return round(x, 12)


def split_budget(
    length: int,
    budget: float,
    window_ratio: float,
    cross_ratio: float = 0.5,
    recent_bias: float = 1.0,
    faithful: bool = False,
    query_window: int = 0,
) -> Budget:
    """CSP's budget split for a prompt of ``length`` tokens.

    ``budget`` is the kept fraction of the prompt (the authors' ``hh_ratio + recent_ratio``),
    ``window_ratio`` the authors' ``recent_ratio`` and ``recent_bias`` their ``kv_recent_bias``
    (beta). ``k_cross = int(k * cross_ratio)`` and ``k_self = k - k_cross``, so exactly ``k``
    tokens are ranked; ``faithful=True`` keeps the authors' ``k_self = int(k * (1 -
    cross_ratio))`` (one token short when ``k * cross_ratio`` is not whole) and their fixed
    ``(k_cross, k_self) = (1, 308)`` for ``cross_ratio <= 0``.

    ``query_window`` caps the scoring queries apart from the kept tokens: the last
    ``min(W, query_window)`` queries score the prompt, while the recent and ranked counts stay
    those of ``window_ratio`` (0: no cap, the paper's ``W``).
    """
    hh = int(length * _frac(budget - window_ratio))
    span = int(length * window_ratio)
    window = min(span, query_window) if query_window else span
    recent = span if recent_bias == 1 else int(span * recent_bias)
    k = hh + span - recent
    if faithful and cross_ratio <= 0:
        k_cross, k_self = AUTHORS_ZERO_CROSS_QUOTAS
    else:
        k_cross = int(k * cross_ratio)
        # ours spends every ranked token; the authors' second truncation can lose one
        k_self = int(k * (1 - cross_ratio)) if faithful else k - k_cross
    return Budget(
        length=length,
        hh=hh,
        window=window,
        recent=recent,
        k=k,
        k_self=k_self,
        k_cross=k_cross,
        keep_all=(
            budget >= 1 or span == 0 or hh + span >= length or length - recent < k_self + k_cross
        ),
    )


def split_count(length: int, kept: int, window_ratio: float, cross_ratio: float = 0.5) -> Budget:
    """CSP's split of a given number of ``kept`` tokens (a library that fixes the kept count
    itself, as kvpress does): the last ``W = int(length * window_ratio)`` tokens score the
    prompt and are kept (at most ``kept`` of them: kvpress's count truncates ``length * (1 -
    compression_ratio)`` in floating point, which can fall one short of the window), and the
    other ``kept - W`` are ranked, ``int(k * cross_ratio)`` of them by the cross score.
    Nothing is pruned when ``kept >= length`` or ``W == 0``."""
    if not 0 <= kept <= length:
        raise ValueError(f"kept must be in [0, length={length}], got kept={kept}")
    window = min(int(length * window_ratio), kept)
    k = kept - window
    k_cross = int(k * cross_ratio)
    return Budget(
        length=length, hh=k, window=window, recent=window, k=k, k_self=k - k_cross,
        k_cross=k_cross, keep_all=kept >= length or window == 0,
    )  # fmt: skip
