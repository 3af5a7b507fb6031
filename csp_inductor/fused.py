"""Element-wise chains of the CPU paths as Inductor kernels.

Eager PyTorch runs a chain such as ``x.sub_(shift).exp_()`` as one kernel per op, each a pass
over memory, and its ``exp`` is measured at half the speed of the one Inductor generates on
CPU. :class:`Fused` compiles such a function at its first call, with dynamic shapes, and runs
the function itself, with the same results up to rounding, once the compiler fails.
"""

from __future__ import annotations

import warnings

import torch

# What torch.compile raises when it cannot compile (as opposed to errors of the compiled code,
# which eager execution raises again).
COMPILER_ERRORS = (
    torch._dynamo.exc.TorchDynamoException,
    torch._dynamo.exc.FailOnRecompileLimitHit,
)


class Fused:
    """``fn`` compiled by Inductor (``fullgraph``, dynamic shapes) at its first call; ``fn``
    itself for every call after a compiler failure (one warning naming ``what``). ``graphs``
    counts the graphs compiled for it."""

    def __init__(self, fn, what: str):
        self.fn = fn
        self.what = what
        self.graphs = 0
        self.failure: str | None = None  # why fn runs eagerly, once it does
        # Dynamo guards on the thread count and on the inputs' autograd state (inference mode,
        # no_grad, grad): a graph for each combination a process uses
        self.compiled = torch.compile(
            fn, backend=self._inductor, fullgraph=True, dynamic=True, recompile_limit=32
        )

    def _inductor(self, graph, example_inputs):
        compiled = torch._dynamo.lookup_backend("inductor")(graph, example_inputs)
        self.graphs += 1
        return compiled

    def __call__(self, *args):
        if self.failure is not None:
            return self.fn(*args)
        try:
            return self.compiled(*args)
        except COMPILER_ERRORS as error:
            self.failure = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
            warnings.warn(
                f"csp_inductor: torch.compile failed on {self.what} ({self.failure}); it runs "
                "eagerly from now on, with the same results up to rounding.",
                RuntimeWarning,
                stacklevel=2,
            )
            return self.fn(*args)
