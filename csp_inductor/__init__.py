"""csp_inductor: Cross-Self Pruning of the KV cache for vision-language models.

``import csp_inductor`` registers our ``torch.library`` ops and patches nothing; a model is
only changed by :func:`compile`, and the change can be undone.
"""

import importlib
import importlib.abc
import importlib.util
import sys

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

# the evaluation modules under their names from before csp_inductor.evaluation
_MOVED = {
    f"{__name__}.{m}": f"{__name__}.evaluation.{m}"
    for m in ("eval", "haystack", "milebench", "train")
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """``import csp_inductor.haystack`` gives ``csp_inductor.evaluation.haystack`` itself (one
    module, one state); ``python -m csp_inductor.train`` runs the moved module's code."""

    def find_spec(self, name, path=None, target=None):
        if name not in _MOVED:
            return None
        origin = importlib.util.find_spec(_MOVED[name]).origin  # python -m's sys.argv[0]
        return importlib.util.spec_from_loader(name, self, origin=origin)

    def create_module(self, spec):
        return importlib.import_module(_MOVED[spec.name])

    def exec_module(self, module) -> None:
        pass  # imported already by create_module

    def get_code(self, name):  # runpy (python -m)
        return importlib.util.find_spec(_MOVED[name]).loader.get_code(_MOVED[name])


if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
    sys.meta_path.append(_MovedModules())


def __getattr__(name: str):  # from csp_inductor import haystack
    if f"{__name__}.{name}" in _MOVED:
        return importlib.import_module(_MOVED[f"{__name__}.{name}"])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
