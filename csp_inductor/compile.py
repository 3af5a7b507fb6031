"""``csp_inductor.compile(model)``: route a transformers (VL)M's decoder through the backend, and
``restore(model)`` to undo it.

The backend (:mod:`csp_inductor.backend`) prunes the KV cache of every prompt with the policy,
attends to the pruned cache after it, and compiles the decoder with ``torch.compile``: a graph
for the prefill (attention + scoring + selection + compaction, the last three inside the
``csp_inductor::compact_`` op), one for decode steps and one for the later turns of a
conversation, each for batch 1 and for larger batches, whatever the prompt lengths, decode
capacities and policies; a compiler failure falls back to eager with one warning.

A conversation continues a cache: the first forward of a ``generate`` call on a cache that
holds a prompt (or, outside ``generate``, any forward of several tokens) is a turn, prefilled
against the kept prefix and pruned by the policy as a prompt of its own length. With
``max_cache_tokens`` the cache is re-pruned by the policy whenever it is full. With
``prefill_chunk`` a long prompt streams through the decoder a chunk at a time
(:mod:`csp_inductor.backend.stream`): its KV never exists whole.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from .backend import Backend
from .policies import CSP, Policy

DEFAULT_DECODE_CAPACITY = 256


@dataclass(frozen=True)
class Options:
    """The options of :func:`compile` (see there), checked."""

    kernel: str = "auto"
    decode_capacity: int = DEFAULT_DECODE_CAPACITY
    compile: bool = True
    dynamic: bool = True
    decode_softmax_n: float | None = None
    max_cache_tokens: int | None = None
    prefill_chunk: int | None = None

    def __post_init__(self):
        capacity, n, bound = self.decode_capacity, self.decode_softmax_n, self.max_cache_tokens
        chunk = self.prefill_chunk
        if not _count(capacity, 1):
            raise ValueError(
                f"decode_capacity must be an int >= 1, got decode_capacity={capacity!r}"
            )
        if n is not None and not (isinstance(n, (int, float)) and 0 < n < math.inf):
            raise ValueError(
                "decode_softmax_n must be None (ordinary softmax) or a finite number > 0, got "
                f"decode_softmax_n={n!r}"
            )
        if bound is not None and not _count(bound, 2):
            raise ValueError(
                "max_cache_tokens must be None (no bound) or an int >= 2, got "
                f"max_cache_tokens={bound!r}"
            )
        if chunk is not None and not _count(chunk, 1):
            raise ValueError(
                "prefill_chunk must be None (prefill a prompt whole) or an int >= 1, got "
                f"prefill_chunk={chunk!r}"
            )
        if chunk is not None and bound is not None and chunk >= bound:
            raise ValueError(
                f"prefill_chunk must be below max_cache_tokens, which holds the cache and a "
                f"chunk; got prefill_chunk={chunk} with max_cache_tokens={bound}"
            )

    @property
    def null_logit(self) -> float | None:
        """The decode-time n-softmax's null slot logit, ln n (None: ordinary softmax)."""
        return None if self.decode_softmax_n is None else math.log(self.decode_softmax_n)


def _count(value, least: int) -> bool:
    """Whether ``value`` is an int (not a bool) of at least ``least``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def compile(model: nn.Module, policy: Policy | None = None, **options) -> nn.Module:
    """Make ``model`` prune its KV cache with ``policy`` (default ``CSP()``) and compile it.

    Options:

    - ``kernel``: ``"auto"`` (the default), ``"sdpa"`` or ``"flex"``;
    - ``decode_capacity``: cache room for new tokens when not generating through ``generate``
      (which sizes it by ``max_new_tokens``);
    - ``compile``: False runs the backend eagerly, for debugging;
    - ``dynamic``: symbolic prompt lengths (default True);
    - ``decode_softmax_n``: None (the default) is the ordinary softmax at decode; n > 0 is the
      n-softmax over the pruned cache, through a null KV slot whose logit is pinned to ln n
      (an ablation);
    - ``max_cache_tokens``: None (the default) is unbounded; N makes the cache hold at most N
      tokens per row: when generation fills it, the policy prunes the held tokens again,
      scoring them with the queries of the last tokens, as it prunes a prompt of N tokens;
    - ``prefill_chunk``: None (the default) prefills a prompt whole; C streams a longer prompt
      through the decoder C tokens at a time, each chunk attending to the cache and causally to
      itself. Alone, each chunk's tokens are pruned by the policy as they arrive (ranked by the
      chunk's own window, as a turn's are; a question-agnostic policy re-reads each chunk and
      keeps its budget of all the tokens seen): the cache grows with the budget, not the
      prompt.
      With ``max_cache_tokens=N``, chunks are kept whole until the cache is full, then the held
      tokens are re-pruned by the bound (ranked by the last chunk's window): a hard cap of N
      tokens, whatever the prompt's length.

    Returns the same model, changed in place; :func:`restore` undoes it. The backend is
    ``model.csp_backend``.
    """
    if getattr(model, "csp_backend", None) is not None:
        raise ValueError("this model is already compiled by csp_inductor; restore(model) first")
    backend = Backend(model, CSP() if policy is None else policy, Options(**options))
    backend.install()
    return model


def restore(model: nn.Module) -> nn.Module:
    """Undo :func:`compile`: the model's own attention, no hooks, no compiled decoder or LM
    head. (The ``"csp_inductor"`` attention and mask functions stay registered with
    transformers: process-wide, shared by every compiled model, selected by none once
    restored.)"""
    backend = getattr(model, "csp_backend", None)
    if backend is None:
        raise ValueError("this model was not compiled by csp_inductor")
    backend.uninstall()
    return model
