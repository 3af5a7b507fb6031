"""A policy that ranks by the layers' own inputs (kvpress's presses): hooks collect each pruned
layer's forward arguments during a prompt's (eager) forward, into its step."""

from __future__ import annotations

import functools
import inspect
from typing import TYPE_CHECKING

from .step import Step

if TYPE_CHECKING:
    from .core import Backend


def collect(backend: Backend, step: Step) -> None:
    """For this forward, run eagerly: each pruned attention layer's forward arguments, for
    :meth:`Policy.layer_scores`, and the decoder's rotary embedding on each layer's module
    (kvpress's scorers rebuild queries with it). Ending the step removes it all."""
    policy = backend.policy
    if step.padding is not None and bool(step.padding.any()):
        raise ValueError(
            f"{policy!r} scores prompts without a padding mask (kvpress's scorers have none); "
            "send rows of equal length (or one at a time)"
        )
    policy.prepare(backend.model)
    step.scorer = policy
    if backend.compiled is not None:
        backend.compiled.eager_next = True
        step.undo.callback(setattr, backend.compiled, "eager_next", False)
    step.undo.callback(step.layer_inputs.clear)
    rotary = getattr(backend.decoder, "rotary_emb", None)
    if rotary is not None and "layer_type" in inspect.signature(rotary.forward).parameters:
        rotary = None  # (Gemma 3's: one per layer type, which kvpress's presses do not pass)
    for attn in backend.attention_modules("attention").values():
        hook = functools.partial(_collect, step, inspect.signature(attn.forward))
        step.undo.callback(attn.register_forward_pre_hook(hook, with_kwargs=True).remove)
        if rotary is not None and not hasattr(attn, "rotary_emb"):
            attn.rotary_emb = rotary
            step.undo.callback(delattr, attn, "rotary_emb")


def _collect(step: Step, signature, module, args, kwargs) -> None:
    """An attention layer's forward arguments by name (its ``**kwargs`` among them)."""
    named = signature.bind_partial(*args, **kwargs).arguments
    for param in signature.parameters.values():
        if param.kind is param.VAR_KEYWORD:
            named.update(named.pop(param.name, {}))
    step.layer_inputs[module.layer_idx] = dict(named)
