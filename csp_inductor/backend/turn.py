"""Planning a conversation's next turn: :func:`plan_turn`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from . import room
from .prompt import Inputs, padding, visual_tokens
from .step import Step

if TYPE_CHECKING:
    from ..cache import PrunedCache
    from .core import Backend


def plan_turn(backend: Backend, step: Step, inputs: Inputs, keep_all: bool = False) -> None:
    """A new turn of a conversation on a cache that holds the earlier ones: its tokens see the
    kept prefix, and the policy prunes them as a prompt of their own length (``keep_all``: they
    are all kept, as a streamed prompt's chunks under a bound are)."""
    cache, q_len, policy = step.cache, inputs.q_len, backend.policy
    if backend.layout.kv_source:
        raise ValueError(
            f"csp_inductor cannot continue a conversation on {type(backend.model).__name__}: "
            "its layers share K/V and compute only the last queries of a turn; start a new "
            "cache per prompt"
        )
    if inputs.mask is not None:
        _check_turn_mask(inputs.mask, cache, q_len)
    step.is_image = visual_tokens(backend, inputs)
    step.padding, pads = padding(inputs.mask, inputs.batch, q_len, step.is_image.device)
    kept = [policy.budget_for(q_len - p).kept for p in pads]
    # what the turn's compaction keeps: the policy's; a policy scored by its layers' inputs
    # (kvpress's presses) prunes prompts only and keeps a turn whole, as kvpress does
    if policy.needs_layer_inputs or keep_all:
        kept, step.keep = [q_len - p for p in pads], backend.full_index
    if cache.bound is not None:  # (an unbounded cache grows for the turn and its answer)
        room.make_room(backend, cache, q_len)
    call = backend.generating
    cache.start_turn(q_len, kept, pads, room=0 if call is None else call.new_tokens)
    step.padding_slots = room.padding_slots(cache, step.padding, q_len)
    backend.block_masks.clear()


def _check_turn_mask(mask: torch.Tensor, cache: PrunedCache, q_len: int) -> None:
    seen = int(cache.seen)
    if mask.shape[1] not in (q_len, seen + q_len):
        raise ValueError(
            f"attention_mask must cover the turn's {q_len} new tokens, or the whole "
            f"conversation ({seen} earlier + {q_len} new = {seen + q_len}); got "
            f"attention_mask.shape={tuple(mask.shape)}"
        )
    if mask.shape[1] > q_len:
        earlier = (mask[:, :-q_len] == 0).sum(dim=1).tolist()
        if earlier != cache.padding:
            raise ValueError(
                "attention_mask must mask, before the new turn, exactly the padding of "
                f"the earlier turns ({cache.padding} tokens per row); got {earlier}: "
                "tokens already in the cache cannot be masked afterwards"
            )
