"""Streaming prefill (``prefill_chunk``): a prompt longer than the chunk goes through the decoder
a chunk at a time, so its K/V, and the attention over it, never exist whole.

The model's own forward runs as without streaming up to its decoder: the vision tower, the
merge of image features into the embeddings, the positions (M-RoPE included). The decoder's
forward (:class:`StreamedForward`) then runs the prompt in chunks of ``prefill_chunk`` tokens,
each sliced from what the model gave it: the first is a prompt (:func:`.prompt.plan_prompt`),
each later one a turn on the cache (:func:`.turn.plan_turn`), attending to the cache and
causally to itself, at the positions the model computed for the whole prompt. (A LLaVA runs
its own forward per chunk instead, each chunk's images encoded alone: :mod:`.stream_model`.)
What each chunk keeps:

- without a bound, a window policy prunes each chunk's tokens as they arrive, ranked by the
  chunk's own window (the last chunk's is the prompt's end, where the question usually is),
  as it prunes a turn: the cache holds the budget of the tokens seen, never the prompt;
- with ``max_cache_tokens=N``, chunks are kept whole; when the next chunk would not fit, the
  bound re-prunes the held tokens (:mod:`.bound`), ranked by the queries it remembers, the
  window of the chunk just read: a hard cap of N tokens per row. With N at least the prompt,
  nothing is pruned and the tokens are the unmodified model's;
- a question-agnostic policy (``KVzip``, ``CSP(scoring="reconstruct")``) keeps each chunk
  whole, re-reads it (attending to what the cache holds before it, :mod:`.reread`), and keeps
  its budget of every token seen among those held, ranked by the re-read scores they carry
  from chunk to chunk.

A chunk that raises leaves the cache empty, as it was before the prompt.
"""

from __future__ import annotations

import inspect
import itertools
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from . import prompt, reread, room, turn
from .step import PREFILL, TURN, Carried, Step

if TYPE_CHECKING:
    from ..cache import PrunedCache
    from .core import Backend

# the decoder's arguments a chunk takes its slice of, and the dimension of their tokens
PER_TOKEN = {"input_ids": 1, "inputs_embeds": 1, "position_ids": -1, "cache_position": -1}
WHOLE_PROMPT_OUTPUTS = ("output_hidden_states", "output_attentions")


class Stream(NamedTuple):
    """A prompt the decoder streams: the model forward's inputs (ids, token types, 2D mask:
    the modality and padding of every chunk) and its ``logits_to_keep`` (the last positions
    whose hidden states it needs; 0 or None: all of them)."""

    inputs: prompt.Inputs
    logits_to_keep: object


def streams(backend: Backend, step: Step, inputs: prompt.Inputs, logits_to_keep) -> bool:
    """Whether a prompt's forward streams (a prompt longer than the chunk, into a cache); if so
    its step records it, and its chunks are planned as they run."""
    chunk = backend.options.prefill_chunk
    if chunk is None or step.cache is None or inputs.q_len <= chunk:
        return False
    step.stream = Stream(inputs, logits_to_keep)
    return True


def named_arguments(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict:
    """A call's arguments by name (those given), its ``**kwargs`` among them."""
    named = {}
    for name, value in signature.bind(*args, **kwargs).arguments.items():
        kind = signature.parameters[name].kind
        named.update(value if kind is inspect.Parameter.VAR_KEYWORD else {name: value})
    return named


class StreamedForward:
    """The decoder's forward: the prompt of a streaming step in chunks (:func:`stream_decoder`),
    any other forward by the wrapped one (the compiled forward, or the decoder's own)."""

    def __init__(self, backend: Backend, forward, signature: inspect.Signature):
        self.backend, self.forward, self.signature = backend, forward, signature
        self.__signature__ = signature  # what generate and transformers inspect

    def __call__(self, *args, **kwargs):
        step = self.backend.step
        if step is None or step.stream is None:
            return self.forward(*args, **kwargs)
        return self.stream(step, named_arguments(self.signature, args, kwargs))

    def stream(self, step: Step, kwargs: dict):
        """The forward of a streaming step, its arguments by name."""
        return stream_decoder(self.backend, step, self.forward, kwargs)


def stream_decoder(backend: Backend, outer: Step, forward, kwargs: dict):
    """The decoder's forward of ``outer``'s prompt, chunk by chunk, each given its slice of what
    the model gave the decoder; its output is the last chunk's, with the hidden states of the
    whole prompt (or only of the last chunk when the model keeps only positions inside it, as
    ``generate`` does)."""
    inputs = outer.stream.inputs
    _check(backend, kwargs, inputs.q_len)
    spans = chunk_spans(inputs.q_len, backend.options.prefill_chunk, inputs.mask)

    def forward_chunk(step: Step, lo: int, hi: int, last_only: bool):
        chunk = _chunk_kwargs(kwargs, lo, hi, inputs.mask)
        if step.rereads:  # (the decoder's pre-hook, which captures it, ran for the prompt)
            reread.capture_prompt(backend, None, (), chunk)
        return forward(**chunk)

    return run(backend, outer, spans, forward_chunk, "last_hidden_state")


def run(backend: Backend, outer: Step, spans: list[tuple[int, int]], forward_chunk, field: str):
    """``outer``'s prompt in the chunks ``spans``: each chunk's step planned, then
    ``forward_chunk(step, lo, hi, last_only)`` run (an output whose first item is the chunk's
    ``field``, per token), then the step finished. Returns the last chunk's output, its
    ``field`` those of the whole prompt joined (or the last chunk's alone, ``last_only``: the
    model keeps only positions inside it). A chunk that raises leaves the cache empty."""
    inputs, cache = outer.stream.inputs, outer.cache
    keep = outer.stream.logits_to_keep
    last_only = isinstance(keep, int) and 0 < keep <= spans[-1][1] - spans[-1][0]
    bounded = cache.bound is not None
    carried = Carried({}, []) if backend.policy.reconstruction is not None else None
    parts, output = [], None
    try:
        for lo, hi in spans:
            step = _start_chunk(backend, cache, inputs, lo, hi, bounded, carried)
            output = forward_chunk(step, lo, hi, last_only)
            if not last_only or hi == inputs.q_len:
                parts.append(output[0])
            backend.finish_step(hi - lo)
    except BaseException:
        backend.end_step()
        cache.forget()
        raise
    finally:
        backend.step = outer
    # one prompt, as the cache reports it: its real tokens, and what the cache holds (the
    # chunks may have re-pruned each other)
    real = [sum(row) for row in zip(*(r for r, _ in cache.turns[-len(spans) :]), strict=True)]
    cache.turns[-len(spans) :] = [(real, list(cache.rows))]
    if not bounded:  # (grown ahead of the chunks) down to the kept tokens and decode room
        call = backend.generating
        cache.fit(backend.decode_capacity if call is None else call.new_tokens)
        backend.block_masks.clear()
    joined = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    if isinstance(output, tuple):
        return (joined, *output[1:])
    setattr(output, field, joined)
    return output


def chunk_spans(
    length: int, chunk: int, mask: Tensor | None, allowed: Tensor | None = None
) -> list[tuple[int, int]]:
    """The ``[lo, hi)`` token spans of a prompt's chunks: ``chunk`` tokens each, the first
    longer where a row's left padding would leave it no real token. ``allowed`` (length + 1,)
    bool: where a chunk may end (not inside an image); a chunk then ends at the last allowed
    place within its tokens, or past them at the first (an image longer than a chunk)."""
    first = chunk
    if mask is not None:
        leading = (mask.cumsum(dim=1) == 0).sum(dim=1).max()
        first = max(chunk, int(leading) + 1)
    bounds = [0]
    while bounds[-1] < length:
        lo = bounds[-1]
        hi = min(lo + (first if lo == 0 else chunk), length)
        if allowed is not None and not bool(allowed[hi]):
            inside = allowed[lo + 1 : hi].nonzero()
            hi = lo + 1 + int(inside[-1]) if len(inside) else hi + int(allowed[hi:].nonzero()[0])
        bounds.append(hi)
    return list(itertools.pairwise(bounds))


def _start_chunk(
    backend, cache: PrunedCache, inputs, lo: int, hi: int, bounded: bool, carried: Carried | None
) -> Step:
    """The step of the chunk ``[lo, hi)``: the prompt's first, or a turn on the cache. Under a
    bound it is kept whole. A question-agnostic policy (``carried``) keeps it whole too, then
    re-reads it and keeps its budget of every token seen among those held (:mod:`.reread`)."""
    step = backend.step = backend.new_step(PREFILL if lo == 0 else TURN, cache)
    ids, types, mask = (None if t is None else t[:, :hi] for t in inputs[:3])
    chunk = prompt.Inputs(ids, types, mask, inputs.batch, hi - lo)
    if carried is not None:
        carried.seen[:] = [hi] * inputs.batch if mask is None else mask.sum(dim=1).tolist()
        step.carried = carried
    if lo == 0:
        prompt.plan_prompt(backend, step, chunk, keep_all=bounded, modality=carried is not None)
        return step
    need = hi - lo + (0 if carried is None else reread.chunk_width(backend))
    if cache.bound is None and cache.room() < need:
        # grown by half at least: a stream grows it at almost every chunk
        cache.grow(max(need - cache.room(), cache.longest // 2))
        backend.block_masks.clear()
    turn.plan_turn(backend, step, chunk, keep_all=bounded or carried is not None)
    if carried is not None and not all(backend.policy.budget_for(n).keep_all for n in carried.seen):
        step.rereads = True
        if hi == inputs.q_len:  # the prompt's end (its question) kept as a whole prompt's is
            recent = [backend.policy.budget_for(n).recent for n in carried.seen]
            step.reread_recent = [min(r, hi - lo) for r in recent]
    if step.kernel == "flex":
        step.block_masks = room.block_masks(backend, step, hi - lo)
    return step


def _chunk_kwargs(kwargs: dict, lo: int, hi: int, mask: Tensor | None) -> dict:
    """The decoder's arguments for the chunk ``[lo, hi)``: its tokens' slices, and the prompt's
    padding mask up to its end (the backend's attention applies the padding itself)."""
    out = dict(kwargs)
    for name, dim in PER_TOKEN.items():
        if isinstance(kwargs.get(name), Tensor):
            out[name] = kwargs[name].narrow(dim, lo, hi - lo)
    out["attention_mask"] = None if mask is None else mask[:, :hi]
    return out


def _check(backend: Backend, kwargs: dict, length: int) -> None:
    """Refuse what a chunk cannot be given: outputs over the whole prompt, a mask that is not
    causal (images attending bidirectionally: a chunk attends causally), and per-token inputs
    the stream does not split."""
    model = type(backend.model).__name__
    for name in WHOLE_PROMPT_OUTPUTS:
        if kwargs.get(name):
            raise ValueError(
                f"prefill_chunk streams a prompt through the decoder, which never holds every "
                f"layer's output over it; got {name}=True: prefill without prefill_chunk"
            )
    mask = kwargs.get("attention_mask")
    for dense in mask.values() if isinstance(mask, dict) else [mask]:
        if isinstance(dense, Tensor) and dense.dim() == 4 and bool(dense.triu(1).any()):
            raise ValueError(
                f"prefill_chunk streams a prompt with causal attention, but {model} asks for "
                "attention to later tokens in this prompt (e.g. among an image's tokens): "
                "prefill it without prefill_chunk"
            )
    split = {*PER_TOKEN, "attention_mask", backend.decoder_cache_arg}
    for name, value in kwargs.items():
        if name not in split and _holds_tensor(value):
            raise ValueError(
                f"prefill_chunk cannot stream the prompt of {model}: its decoder takes "
                f"{name!r} beside the prompt's {length} tokens, which a chunk cannot be given a "
                "slice of; prefill it without prefill_chunk"
            )


def _holds_tensor(value) -> bool:
    if isinstance(value, (list, tuple)):
        return any(_holds_tensor(v) for v in value)
    return isinstance(value, Tensor)
