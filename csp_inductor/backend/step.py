"""One forward of the model, as the attention function sees it.

The backend's pre-hook (:mod:`.dispatch`) decides what the forward is and makes its
:class:`Step`; the attention function of every pruned layer reads the step and its cache and
nothing else; the post-hook ends it. A step lives for one forward: nothing in it needs clearing
when a forward raises, the next forward makes a new one.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

from torch import Tensor

if TYPE_CHECKING:
    from ..cache import PrunedCache
    from ..model_layout import ModelLayout
    from ..policies import Policy, Reconstruction
    from .stream import Stream

# What a forward is, decided once per forward by the dispatch:
PREFILL = "prefill"  # a prompt (into an empty cache), or tokens without a cache
TURN = "turn"  # a later turn of a conversation: attends to the kept prefix, then is pruned
DECODE = "decode"  # new tokens appended to the cache (generated ones)
REREAD = "reread"  # a chunk of the prompt re-read to score it, never kept


class Reread(NamedTuple):
    """A running re-read (:mod:`.reread`): each layer's scores (b, hkv, 2, capacity) by layer
    index, the chunk's scored queries and their modality (b, width), and the policy and its
    reconstruction."""

    scores: dict[int, Tensor]
    scored: Tensor
    is_image: Tensor
    policy: Policy
    reconstruction: Reconstruction


class Carried(NamedTuple):
    """A streamed prompt re-read chunk by chunk (:mod:`.stream`): the re-read scores of the
    tokens the cache holds, by layer (b, hkv, 2, slots), carried from chunk to chunk, and each
    row's real tokens seen so far (what the policy keeps its budget of)."""

    scores: dict[int, Tensor]
    seen: list[int]


@dataclass
class Step:
    """What one forward needs. ``cache`` is None for a forward without a cache (a prefill that
    stores nothing). Per-token fields cover the forward's own tokens (b, t)."""

    phase: str
    cache: PrunedCache | None
    layout: ModelLayout
    kernel: str  # the attention kernel ("sdpa" or "flex")
    null_logit: float | None = None  # decode-time n-softmax: the null slot's logit (None: off)
    is_image: Tensor | None = None  # (b, t) the visual tokens (prefill, turn)
    padding: Tensor | None = None  # (b, t) the padding tokens (None: none)
    starts: Tensor | None = None  # (b,) each row's left padding (a prefill)
    # (b, capacity) the padding tokens' slots in the buffers (a turn or a re-read chunk), by
    # layer (None: every layer's, where they keep the same count); None: no padding
    padding_slots: dict[int | None, Tensor] | None = None
    # flex block masks by layer (None: the global layers' shared one, where they keep the same
    # count), decode, turn, re-read
    block_masks: dict[int | None, object] = field(default_factory=dict)
    keep: Tensor | None = None  # () the policy index a prompt's or turn's compaction keeps by
    # a policy that scores from the layers' own inputs: those inputs, collected by hooks
    # during this (eager) forward, by layer, and the policy
    layer_inputs: dict[int, dict] = field(default_factory=dict)
    scorer: Policy | None = None
    # an adaptive policy's prompt: each layer's window scores (b, hkv, 2, L), written by its
    # compaction, which the layers' counts are decided by once the forward is done
    layer_scores: dict[int, Tensor] = field(default_factory=dict)
    reread: Reread | None = None  # a re-read chunk's scoring
    # a prompt to re-read once its forward is done, and its embeddings, modality, padding and
    # next position, captured at the decoder's input (:mod:`.reread`)
    rereads: bool = False
    prompt: tuple | None = None
    # a streamed prompt's chunk: what its re-read carries on from the earlier chunks' (the
    # held tokens' scores, the tokens seen), and how many of the last tokens it keeps whatever
    # they score (the last chunk: the whole prompt's recent tokens)
    carried: Carried | None = None
    reread_recent: list[int] | None = None
    # a prompt the decoder streams in chunks (:mod:`.stream`), each with a step of its own
    stream: Stream | None = None
    # what the step set up outside itself (hooks, flags), undone when it ends
    undo: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def padding_slots_of(self, index: int) -> Tensor | None:
        """Layer ``index``'s padding slots (a turn or a re-read chunk; None: none)."""
        slots = self.padding_slots
        if slots is None:
            return None
        return slots[index] if index in slots else slots[None]

    @property
    def cached(self) -> bool:
        """Whether the attention reads the cache (a turn, a decode step, a re-read chunk)."""
        return self.phase != PREFILL

    @property
    def as_turn(self) -> bool:
        """Whether the tokens attend as a turn: to the kept prefix and causally to themselves,
        their padding hidden (a turn, and a re-read chunk)."""
        return self.phase in (TURN, REREAD)
