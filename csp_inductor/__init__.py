"""csp_inductor: Cross-Self Pruning of the KV cache for vision-language models.

``import csp_inductor`` registers our ``torch.library`` ops and patches nothing; a model is
only changed by :func:`compile`, and the change can be undone.
"""

from . import ops as _ops  # noqa: F401  (registers csp_inductor::* ops)
from .budget import Budget, split_budget
from .cache import PrunedCache
from .compile import compile, restore
from .policies import (
    CSP,
    H2O,
    POLICIES,
    Full,
    KNorm,
    KVzip,
    LookM,
    Oracle,
    Policy,
    RandomKeep,
    ScoredPolicy,
    SnapKV,
    StreamingLLM,
    make_policy,
)
from .scoring import decomposed_scores, n_softmax

__version__ = "0.1.0"

__all__ = [
    "CSP",
    "H2O",
    "POLICIES",
    "Budget",
    "Full",
    "KNorm",
    "KVzip",
    "LookM",
    "Oracle",
    "Policy",
    "PrunedCache",
    "RandomKeep",
    "ScoredPolicy",
    "SnapKV",
    "StreamingLLM",
    "compile",
    "decomposed_scores",
    "make_policy",
    "n_softmax",
    "restore",
    "split_budget",
]
