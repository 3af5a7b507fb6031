"""Planning a prompt's forward: its modality and padding, what each row keeps, and the cache
allocated for it (:func:`plan_prompt`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch

from ..attention import leading_padding
from ..cache import row_means
from ..model_layout import modality
from . import adaptive, layer_inputs, reread
from .step import Step

if TYPE_CHECKING:
    from .core import Backend


class Inputs(NamedTuple):
    """What a prompt's or turn's forward was given: ids and token types (None when not
    given), its 2D padding mask (None: no padding), and its size."""

    ids: torch.Tensor | None
    token_types: torch.Tensor | None
    mask: torch.Tensor | None
    batch: int
    q_len: int


def plan_prompt(
    backend: Backend, step: Step, inputs: Inputs, keep_all: bool = False, modality: bool = False
) -> None:
    """A prompt (or tokens without a cache): its modality, padding and row starts; with a cache,
    each row's kept count (in each layer, when the policy shares its budget among them),
    allocated in it. A question-agnostic policy keeps the whole prompt
    and re-reads it once its forward is done; a policy ranking by the layers' inputs collects
    them during the forward. ``keep_all``: nothing is pruned (a streamed prompt's first chunk
    under a bound); ``modality``: the cache stores its slots' modality (a streamed prompt
    whose later chunks are re-read)."""
    param = next(backend.decoder.parameters())
    batch, q_len = inputs.batch, inputs.q_len
    step.is_image = visual_tokens(backend, inputs)
    step.padding, pads = padding(inputs.mask, batch, q_len, param.device)
    step.starts = leading_padding(step.padding)  # where each row's chunks start
    backend.block_masks.clear()
    cache, policy = step.cache, backend.policy
    if cache is None:
        return
    whole = [q_len - p for p in pads]
    budgets = [policy.budget_for(n) for n in whole]
    kept = [budget.kept for budget in budgets]
    rereads = policy.reconstruction is not None and not all(b.keep_all for b in budgets)
    if keep_all:
        kept, step.keep, rereads = whole, backend.full_index, False
    elif rereads:  # everything is kept until the prompt is re-read
        kept, step.keep, step.rereads = whole, backend.full_index, True
    elif policy.needs_layer_inputs and kept != whole:
        layer_inputs.collect(backend, step)
    layer_kept, layers = None, len(cache.pruned)
    adapts = policy.layer_rule == "adaptive" and not keep_all and kept != whole
    if adapts:  # every layer keeps the most it can, trimmed once the forward is done
        layer_kept = [[policy.prefill_count(n) for n in whole]] * layers
    elif policy.layer_rule != "uniform" and not keep_all and kept != whole:
        rows = [policy.layer_counts(n, layers) for n in whole]
        layer_kept = [list(layer) for layer in zip(*rows, strict=True)]
        kept = row_means(layer_kept)
    chunk = reread.chunk_width(backend) if rereads else 0
    cache.start_prefill(
        kept, param.dtype, param.device, step.starts, pads, q_len, chunk, modality, layer_kept
    )
    if adapts:
        step.layer_scores = adaptive.score_buffers(cache, batch, q_len)


def visual_tokens(backend: Backend, inputs: Inputs) -> torch.Tensor:
    """(batch, q_len) bool: the visual tokens among the forward's ``q_len`` tokens."""
    ids, token_types, q_len = inputs.ids, inputs.token_types, inputs.q_len
    if ids is not None:
        ids = ids[:, -q_len:]
    if token_types is not None:
        token_types = token_types[:, -q_len:]
    is_image = modality(backend.layout, ids, token_types)
    if is_image is not None:
        return is_image
    if backend.layout.multimodal:
        raise ValueError(
            "csp_inductor needs input_ids (or mm_token_type_ids) with a prompt or a turn to "
            "know which of its tokens are visual; got inputs_embeds only"
        )
    device = next(backend.decoder.parameters()).device
    return torch.zeros(inputs.batch, q_len, dtype=torch.bool, device=device)


def padding(mask, batch: int, q_len: int, device) -> tuple[torch.Tensor | None, list[int]]:
    """The padding of a forward's ``q_len`` tokens from its 2D mask, (batch, q_len) bool, and
    its count per row. A padding tensor whenever the batch has more than one row, padded or
    not (one graph serves both); None for a lone row without padding (the faster path)."""
    padding = None if mask is None else ~mask[:, -q_len:].bool()
    if batch == 1 and (padding is None or not bool(padding.any())):
        return None, [0]
    if padding is None:
        padding = torch.zeros(batch, q_len, dtype=torch.bool, device=device)
    return padding, padding.sum(dim=1).tolist()
