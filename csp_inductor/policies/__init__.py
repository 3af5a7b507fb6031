"""What to keep: CSP and the baselines, as frozen dataclasses behind one ``select`` interface
(:class:`~.base.Policy`, whose module describes it), and :func:`make_policy`, a policy by name.

- :mod:`.base`: :class:`Policy`, :class:`ScoredPolicy` and :class:`Full`;
- :mod:`.prompt`: :class:`Prompt`, :class:`ScoringWindow` and :class:`Reconstruction`;
- :mod:`.csp`: :class:`CSP`;
- :mod:`.baselines`: :class:`H2O`, :class:`SnapKV`, :class:`LookM`, :class:`StreamingLLM`,
  :class:`RandomKeep`, :class:`KNorm`;
- :mod:`.kvzip`: :class:`KVzip` and :class:`Oracle`.
"""

from __future__ import annotations

from dataclasses import fields

from .base import (
    LAYER_RULES,
    REREAD_WINDOW,
    SCORINGS,
    Full,
    Policy,
    ScoredPolicy,
)
from .baselines import H2O, KNorm, LookM, RandomKeep, SnapKV, StreamingLLM
from .csp import CSP
from .kvzip import KVzip, Oracle
from .prompt import Prompt, Reconstruction, ScoringWindow

POLICIES: dict[str, type[Policy]] = {
    cls.name: cls
    for cls in (Full, CSP, H2O, SnapKV, StreamingLLM, LookM, RandomKeep, KNorm, KVzip, Oracle)
}


def make_policy(name: str, **options: object) -> Policy:
    """A policy by its short name (``"csp"``, ``"snapkv"``, …) with dataclass options."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; known policies: {sorted(POLICIES)}")
    cls = POLICIES[name]
    allowed = {f.name for f in fields(cls)}
    unknown = set(options) - allowed
    if unknown:
        raise ValueError(
            f"policy {name!r} has no option(s) {sorted(unknown)}; its options: {sorted(allowed)}"
        )
    return cls(**options)


__all__ = [
    "CSP",
    "H2O",
    "LAYER_RULES",
    "POLICIES",
    "REREAD_WINDOW",
    "SCORINGS",
    "Full",
    "KNorm",
    "KVzip",
    "LookM",
    "Oracle",
    "Policy",
    "Prompt",
    "RandomKeep",
    "Reconstruction",
    "ScoredPolicy",
    "ScoringWindow",
    "SnapKV",
    "StreamingLLM",
    "make_policy",
]
