"""Every forward of a compiled model starts and ends here: the model's pre-hook decides what the
forward is (the one place the phase is decided) and makes its :class:`~.step.Step`; the
post-hook ends it.

- a prompt, into an empty cache or without one: :func:`.prompt.plan_prompt`;
- a conversation's next turn (the first forward of a ``generate`` call, or any forward of
  several tokens outside one, on a cache that holds a prompt): :func:`.turn.plan_turn`;
- anything else appends to the cache: decode steps (:func:`.room.make_room` first).

A prompt longer than ``prefill_chunk`` is streamed: the decoder runs it in chunks, each with
a step of its own (:mod:`.stream`). Ending a step advances the cache's lengths (outside the
compiled graph) and, for a prompt a question-agnostic policy scores, re-reads it
(:func:`.reread.reread`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers.cache_utils import Cache

from .. import compat
from ..cache import PrunedCache
from . import prompt, room, stream, turn
from .step import DECODE, PREFILL, TURN

if TYPE_CHECKING:
    from .core import Backend


def before_forward(backend: Backend, module, args, kwargs):
    """The model's forward pre-hook: the forward's cache and step."""
    backend.end_step()  # (a failed forward's)
    kwargs = dict(kwargs)
    for name, value in zip(backend.forward_params, args, strict=False):
        kwargs.setdefault(name, value)
    ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
    batch, q_len = (ids if ids is not None else embeds).shape[:2]
    compat.rename_legacy_cache_arg(kwargs, backend.cache_arg)
    cache = kwargs[backend.cache_arg] = _forward_cache(backend, kwargs)
    call = backend.generating
    prepared, prepared_mask = call.take_mask() if call is not None else (False, None)
    first = call is None or call.forwards == 0  # a plain forward or generate's first
    if call is not None:
        call.forwards += 1
    if cache is None or cache.phase == "empty":
        phase = PREFILL
    elif first and q_len > 1:
        phase = TURN
    else:
        phase = DECODE
    step = backend.step = backend.new_step(phase, cache)
    if phase == DECODE:
        room.make_room(backend, cache, q_len)
    else:
        mask = _padding_mask(kwargs.get("attention_mask"), prepared_mask, prepared)
        inputs = prompt.Inputs(ids, kwargs.get("mm_token_type_ids"), mask, batch, q_len)
        keep = kwargs.get("logits_to_keep")
        if phase == TURN:
            turn.plan_turn(backend, step, inputs)
        elif not stream.streams(backend, step, inputs, keep):
            prompt.plan_prompt(backend, step, inputs)
    if cache is not None:
        backend.cache = cache
        if step.cached and step.kernel == "flex":
            step.block_masks = room.block_masks(backend, step, q_len)
    return (), kwargs


def _forward_cache(backend: Backend, kwargs: dict) -> PrunedCache | None:
    """The cache the forward continues: the one given (a turn whose forward raised is
    forgotten first), a new one, or None (``use_cache=False``)."""
    cache = kwargs.get(backend.cache_arg)
    if isinstance(cache, PrunedCache) and cache.phase == "turn":
        cache.abandon_turn()  # the forward of the last turn raised: the cache is as before
    if isinstance(cache, PrunedCache) and cache.phase == "reread":
        raise RuntimeError(
            "this PrunedCache's prompt failed while being re-read to prune it; it holds an "
            "unpruned prompt: create a new cache and send the prompt again"
        )
    if kwargs.get("use_cache") is False:
        return None
    if isinstance(cache, PrunedCache):
        return cache
    if isinstance(cache, Cache) and int(cache.get_seq_length()) > 0:
        raise TypeError(
            f"csp_inductor cannot continue a non-empty {type(cache).__name__}; pass a "
            "PrunedCache (backend.new_cache()) or none"
        )
    return backend.new_cache()


def _padding_mask(mask, prepared_mask, prepared: bool) -> torch.Tensor | None:
    """The 2D attention mask a prompt or turn is padded by: the forward's, or the one generate
    had before it made a 4D one (``prepared``)."""
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        return mask
    if mask is not None and not prepared:
        raise ValueError(
            "csp_inductor reads the prompt's padding from a 2D attention_mask (batch, seq); got "
            f"{type(mask).__name__}{tuple(mask.shape) if isinstance(mask, torch.Tensor) else ''}"
        )
    return prepared_mask


def after_forward(backend: Backend, module, args, kwargs, output):
    """The model's forward hook: end the step; the cache moves past the forward's tokens,
    and a prompt to re-read is re-read."""
    if backend.step is not None and backend.step.stream is not None:
        backend.end_step()  # (its chunks moved the cache)
        return output
    ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
    backend.finish_step((ids if ids is not None else embeds).shape[1])
    return output
