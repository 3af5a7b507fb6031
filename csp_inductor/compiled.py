"""Compile or fall back: the one mechanism behind every function the library compiles.

The decoder's forward, the LM head of decode steps, the bounded cache's re-prune and the CPU
paths' element-wise chains (eager PyTorch runs ``x.sub_(shift).exp_()`` as one kernel per op,
and its ``exp`` is measured at half the speed of Inductor's on CPU) are each a
:class:`Compiled`: Inductor compiles the function at its first call and the calls run its
graphs; when the compiler fails they run the function itself, with one warning.
"""

from __future__ import annotations

import contextlib
import types
import warnings

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

# What torch.compile raises when it cannot compile (as opposed to errors of the compiled code,
# which eager execution raises again).
COMPILER_ERRORS = (
    torch._dynamo.exc.TorchDynamoException,
    torch._dynamo.exc.FailOnRecompileLimitHit,
)


class Compiled:
    """``fn`` compiled by Inductor (``fullgraph``, dynamic shapes, no duck sizing) at its first
    call, behind a code object of its own: Dynamo keys graphs and its recompile limit (8) by
    code object, so each ``Compiled`` counts its own graphs and has its own limit (Dynamo's much
    larger ``accumulated_recompile_limit`` stays process-wide). Dynamo guards on the thread
    count and on the inputs' autograd state too: one graph for each combination a process uses.

    ``fn`` itself runs for every call after a compiler failure (a recompile limit reached, an
    error in Dynamo or Inductor): that call runs ``fn`` first, so that an error of ``fn``'s own
    surfaces as without compilation, then records ``failure`` and warns once, naming ``what``
    and ending with ``then``.
    ``graphs`` counts the graphs compiled so far; ``compiled`` is the compiled function, made
    at the first call (importing needs no compiler) or by :meth:`make`.
    """

    then = "it runs eagerly from now on, with the same results up to rounding."

    def __init__(self, fn, what: str, *, dynamic: bool = True):
        self.fn = fn
        self.what = what
        self.dynamic = dynamic
        self.graphs = 0  # graphs compiled so far
        self.failure: str | None = None  # why fn runs eagerly, once it does
        self.compiled = None

    def inductor_options(self) -> contextlib.AbstractContextManager:
        """What Inductor compiles under (a subclass's config patches)."""
        return contextlib.nullcontext()

    def _inductor(self, graph, example_inputs):
        with self.inductor_options():
            compiled = torch._dynamo.lookup_backend("inductor")(graph, example_inputs)
        self.graphs += 1  # counted once compiled: Dynamo may restart an analysis mid-way
        return compiled

    def __call__(self, *args, **kwargs):
        return self.run(args, kwargs, lambda: self.fn(*args, **kwargs))

    def run(self, args: tuple, kwargs: dict, eager):
        """The compiled function on ``args``/``kwargs``, or ``eager()`` (the same call as the
        caller makes it without compilation) where it cannot run."""
        if self.compiled is None and self.failure is None:
            self.make()
        if self.failure is not None:
            return eager()
        try:
            # No duck sizing: two dims of equal size (a prompt as long as the hidden size, say)
            # would share a symbol and be specialised together.
            with torch.fx.experimental._config.patch(use_duck_shape=False):
                return self.compiled(*args, **kwargs)
        except COMPILER_ERRORS as error:
            out = eager()  # errors of the function itself surface here
            self._fail(error)
            return out

    def make(self) -> None:
        """Make ``compiled`` (Dynamo compiles at its first call); the first call makes it, a
        subclass made with the model may make it at once."""
        name = f"csp_{getattr(self.fn, '__name__', 'fn')}_{id(self):x}"
        try:
            self.compiled = torch.compile(
                own_code(self.fn, name), backend=self._inductor, fullgraph=True,
                dynamic=self.dynamic,
            )  # fmt: skip
        except RuntimeError as error:  # Dynamo does not run on this Python
            self._fail(error)

    def _fail(self, error: Exception) -> None:
        message = (str(error).splitlines() or [""])[0][:300]
        self.failure = f"{type(error).__name__}: {message}"
        warnings.warn(
            f"csp_inductor: torch.compile failed on {self.what} ({self.failure}); {self.then}",
            RuntimeWarning,
            stacklevel=4,
        )


class Fused(Compiled):
    """An element-wise chain of the CPU paths, compiled; ``fn`` itself also runs under a
    dispatch mode (a FLOP counter, say), which Dynamo does not trace."""

    def __call__(self, *args):
        if _get_current_dispatch_mode() is not None:
            return self.fn(*args)
        return super().__call__(*args)


def own_code(fn, name: str):
    """``fn`` behind a trampoline with a code object of its own, named ``name``: what Dynamo
    compiles from it is counted apart from every other caller of ``fn``."""

    def trampoline(*args, **kwargs):
        return fn(*args, **kwargs)

    code = trampoline.__code__.replace(co_name=name)
    return types.FunctionType(code, trampoline.__globals__, name, None, trampoline.__closure__)
