"""The decoder's forward, compiled once per model: :class:`CompiledForward`."""

from __future__ import annotations

import contextlib
import inspect
import sys
import unittest.mock

import torch
import torch._inductor.fx_passes.decompose_mem_bound_mm as _decompose_mm

try:
    from transformers.utils import output_capturing as _output_capturing
except ImportError:  # a transformers without output capturing: nothing to reset
    _output_capturing = None

from ..compiled import Compiled

EAGER_OUTPUTS = ("output_hidden_states", "output_attentions")


class CompiledForward(Compiled):
    """The decoder's forward under ``torch.compile(fullgraph=True)``, with dynamic shapes:
    graphs for the prefill, the decode steps and the turns of a conversation, for batch 1 and
    for larger batches, whatever the prompt lengths, decode capacities and policies (every
    per-forward input is a tensor or a guarded constant of the backend's step). Its graphs
    have a code object of their own, so each backend has its own graphs and its own limit.

    When the compiler fails (the limit reached, or an error in Dynamo or Inductor), the call is
    run eagerly (same function, same results) and so is every later call; one warning says
    why. Errors of the model's own code are raised by the eager run, as without compilation.
    A call asking for hidden states or attention weights runs eagerly, by itself, as does one
    the backend marks (``eager_next``: a prompt scored from its layers' inputs by Python code).
    ``graphs`` counts the graphs compiled for this decoder.
    """

    then = (
        "it runs eagerly from now on, with the same results. A recompile limit means the inputs "
        "varied in a way the graphs do not cover (TORCH_LOGS=recompiles shows how; "
        "torch._dynamo.config.recompile_limit raises the limit); compile(model, "
        "compile=False) runs eagerly from the start."
    )

    def __init__(self, forward, *, dynamic: bool, keep_mask: bool = False):
        super().__init__(forward, "the decoder", dynamic=dynamic)
        self.keep_mask = keep_mask  # the 2D mask is passed (recurrent layers read it)
        self.eager_next = False  # the next call runs eagerly (set by the backend)
        self.signature = inspect.signature(forward)
        self.make()

    def inductor_options(self):
        # bf16/fp16 intermediates rounded where eager rounds them (Inductor would keep fused
        # chains in fp32): the compiled decoder then gives the eager model's tokens, which
        # keeping more precision flips on close calls (a no-op for fp32 models)
        stack = contextlib.ExitStack()
        stack.enter_context(torch._inductor.config.patch(emulate_precision_casts=True))
        stack.enter_context(_one_row_products())
        return stack

    def __call__(self, *args, **kwargs):
        eager, self.eager_next = self.eager_next, False
        if eager or any(kwargs.get(name) for name in EAGER_OUTPUTS):
            return self.fn(*args, **kwargs)
        # Every parameter by name, defaults included: a plain forward and generate (which pass
        # different subsets) then differ in values only, not in the arity Dynamo guards on.
        # A 2D attention mask is not passed (the backend's attention applies the padding
        # itself), so it is not a guard (None vs tensor), except where recurrent layers read it.
        # Masks the model built already (a dict or 4D: its bidirectional blocks) are passed.
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        mask = bound.arguments.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and not self.keep_mask:
            bound.arguments["attention_mask"] = None
        positional, named = _by_name(bound)
        try:
            return self.run(positional, named, lambda: self.fn(*args, **kwargs))
        finally:
            _reset_output_capturing()


@contextlib.contextmanager
def _one_row_products():
    """While Inductor compiles: a one-row matrix product on the CPU (every linear layer of a
    batch-1 decode step) becomes a fused multiply-and-sum, which streams the weight at about
    the read bandwidth where MKL's GEMV gets half of it (bench/README.md). Inductor's pass
    stops at weights of 2048 per side by default; here any size."""
    options = {**torch._inductor.config.post_grad_fusion_options, "decompose_mm_pass": {}}
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch._inductor.config.patch(post_grad_fusion_options=options))
        limit = "cpu_max_other_dimension_decomposition"
        if hasattr(_decompose_mm, limit):  # (a module-level limit in torch 2.13)
            stack.enter_context(unittest.mock.patch.object(_decompose_mm, limit, sys.maxsize))
        yield


def _by_name(bound: inspect.BoundArguments) -> tuple[tuple, dict]:
    """``bound``'s arguments as ``(args, kwargs)`` with every parameter that has a name passed
    by it: passed by position, a decorated forward (transformers' output capturing, run as
    Python when Dynamo is disabled) can receive one twice (``use_cache``)."""
    args, kwargs = [], {}
    for name, value in bound.arguments.items():
        kind = bound.signature.parameters[name].kind
        if kind is inspect.Parameter.POSITIONAL_ONLY:
            args.append(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            args.extend(value)
        elif kind is inspect.Parameter.VAR_KEYWORD:
            kwargs.update(value)
        else:
            kwargs[name] = value
    return tuple(args), kwargs


def _reset_output_capturing() -> None:
    """transformers' output capturing keeps a module-level "compiling" flag while a compiled
    graph runs its decorated forwards. A compiled decoder with FlexAttention leaves it set
    (torch 2.13, transformers 5.24), and the next eager forward (the vision tower of the next
    prompt) then records no hidden states. Clear it, as its own reset would have."""
    collector = getattr(_output_capturing, "_active_collector", None)
    if getattr(collector, "compiling", False):
        collector.reset(None)
