"""Element-wise chains of the CPU paths as Inductor kernels.

Eager PyTorch runs a chain such as ``x.sub_(shift).exp_()`` as one kernel per op, each a pass
over memory, and its ``exp`` is measured at half the speed of the one Inductor generates on
CPU. :class:`Fused` compiles such a function at its first call, with dynamic shapes, and runs
the function itself, with the same results up to rounding, once the compiler fails.
"""

from __future__ import annotations

import warnings

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

# What torch.compile raises when it cannot compile (as opposed to errors of the compiled code,
# which eager execution raises again).
COMPILER_ERRORS = (
    torch._dynamo.exc.TorchDynamoException,
    torch._dynamo.exc.FailOnRecompileLimitHit,
)


class Fused:
    """``fn`` compiled by Inductor (``fullgraph``, dynamic shapes, no duck sizing) at its first
    call; ``fn`` itself under a dispatch mode (which Dynamo does not trace), and for every call
    after a compiler failure (one warning naming ``what``). ``graphs`` counts the graphs
    compiled for it: Dynamo guards on the thread count and on the inputs' autograd state
    (inference mode, no_grad, grad), one graph for each combination a process uses, within
    its recompile limit (8), past which the function runs eagerly."""

    def __init__(self, fn, what: str):
        self.fn = fn
        self.what = what
        self.graphs = 0
        self.failure: str | None = None  # why fn runs eagerly, once it does
        self.compiled = None  # made at the first call: importing needs no compiler

    def _inductor(self, graph, example_inputs):
        compiled = torch._dynamo.lookup_backend("inductor")(graph, example_inputs)
        self.graphs += 1
        return compiled

    def __call__(self, *args):
        if self.compiled is None and self.failure is None:
            try:
                self.compiled = torch.compile(
                    self.fn, backend=self._inductor, fullgraph=True, dynamic=True
                )
            except RuntimeError as error:  # Dynamo does not run on this Python
                self._fail(error)
        if self.failure is not None or _get_current_dispatch_mode() is not None:
            return self.fn(*args)
        try:
            # (no duck sizing: two dims of equal size would share a symbol in the first graph)
            with torch.fx.experimental._config.patch(use_duck_shape=False):
                return self.compiled(*args)
        except COMPILER_ERRORS as error:
            out = self.fn(*args)  # errors of the function itself surface here
            self._fail(error)
            return out

    def _fail(self, error: Exception) -> None:
        message = (str(error).splitlines() or [""])[0][:300]
        self.failure = f"{type(error).__name__}: {message}"
        warnings.warn(
            f"csp_inductor: torch.compile failed on {self.what} ({self.failure}); it runs "
            "eagerly from now on, with the same results up to rounding.",
            RuntimeWarning,
            stacklevel=3,
        )
