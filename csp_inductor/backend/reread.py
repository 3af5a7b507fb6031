"""Question-agnostic scoring: a prompt kept whole at prefill, re-read through the decoder in
chunks to score it, then pruned in place (:func:`reread`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch

from ..ops import reprune_op
from ..policies import Reconstruction
from . import adaptive, room
from .step import REREAD, Reread, Step

if TYPE_CHECKING:
    from ..cache import PrunedCache
    from .core import Backend


def capture_prompt(backend: Backend, module, args, kwargs):
    """The decoder's forward pre-hook: the input embeddings of a prompt to re-read (images as
    the vision tower made them), their modality and padding, and each row's next position."""
    step = backend.step
    if step is None or not step.rereads or step.prompt is not None:
        return None
    embeds, positions = kwargs.get("inputs_embeds"), kwargs.get("position_ids")
    if embeds is None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = backend.decoder.get_input_embeddings()(ids)
    batch, length = embeds.shape[:2]
    if positions is None:  # (after the tokens the cache has seen: a streamed prompt's chunk)
        seen = int(step.cache.seen)
        positions = torch.arange(seen, seen + length, device=embeds.device).expand(batch, -1)
    # each row's next position: past its last real token's (M-RoPE: on every axis; the
    # text row generate puts first, (4, b, L) on Qwen2-VL, is not one of them)
    positions = positions.reshape(-1, batch, length)
    if positions.shape[0] == 4:
        positions = positions[1:]
    if step.padding is not None:
        positions = positions.masked_fill(step.padding, -1)
    after = positions.amax(dim=(0, 2)) + 1
    step.prompt = (embeds.detach(), step.is_image, step.padding, after)
    return None


def chunk_width(backend: Backend) -> int:
    """The most tokens a re-read chunk writes into the cache: the separator and a chunk."""
    return backend.policy.reconstruction.chunk + _separator(backend).shape[1]


def reread(backend: Backend, prompt_step: Step) -> None:
    """Score the prompt the cache holds whole by re-reading it, then prune it in place:
    chunks of each row's real tokens, after the separator, run through the decoder as a turn
    that is never kept (each chunk sees the prompt and itself, causally); every layer folds the
    chunk's attention into its scores (``csp_inductor::reconstruct_scores_``); the policy then
    selects with them (``csp_inductor::reprune_``).

    A streamed prompt's chunk (``prompt_step.carried``) is re-read the same way, attending to
    the tokens held before it, its scores added to those the held tokens carry from earlier
    chunks' re-reads; the policy then keeps its budget of every token seen among those held
    (the last ``prompt_step.reread_recent[b]`` ranked first), and the kept ones' scores are
    carried on."""
    cache, policy = prompt_step.cache, backend.policy
    if prompt_step.prompt is None:
        raise RuntimeError(
            f"csp_inductor did not see the decoder's input embeddings of the prompt of "
            f"{type(backend.model).__name__}, which {policy!r} re-reads"
        )
    embeds, is_image, padding, after = prompt_step.prompt
    reconstruction, carried = policy.reconstruction, prompt_step.carried
    batch, length, _ = embeds.shape
    sep = _separator(backend).to(embeds.dtype)
    everything = torch.arange(length, device=embeds.device)
    tokens = [everything] * batch if padding is None else [everything[~row] for row in padding]
    scores = {layer.index: _carried(carried, layer, batch) for layer in cache.pruned}
    for lo in range(0, max(len(row) for row in tokens), reconstruction.chunk):
        chunk = _chunk(embeds, is_image, tokens, lo, reconstruction, sep)
        scoring = Reread(scores, chunk.scored, chunk.is_image, policy, reconstruction)
        _forward_chunk(backend, cache, chunk, after, scoring)
    _keep_recent(scores, cache.rows, prompt_step.reread_recent)
    held = list(cache.rows)  # (a prompt: held whole)
    dropped = [0] * batch if carried is None else _dropped(policy, carried.seen, held)
    kept = [policy.budget_for(h + d).kept for h, d in zip(held, dropped, strict=True)]
    layer_kept = None  # (a streamed prompt keeps the same count in every layer)
    if policy.layer_rule != "uniform" and carried is None and kept != held:
        slots = torch.arange(cache.pruned[0].keys.shape[2], device=cache.lengths.device)
        free = slots >= torch.tensor(held, device=slots.device)[:, None]  # (no token there)
        by_layer = [scores[layer.index] for layer in cache.pruned]
        layer_kept = adaptive.layer_counts(policy, held, len(cache.pruned), by_layer, free)
    device = cache.lengths.device
    gone = torch.tensor(dropped, dtype=torch.long, device=device)
    for j, (layer, scale) in enumerate(zip(cache.pruned, backend.scales, strict=True)):
        own = kept if layer_kept is None else layer_kept[j]
        target = torch.tensor(own, dtype=torch.long, device=device)
        before = None if carried is None else layer.positions.clone()
        reprune_op(
            layer.keys, layer.values, layer.positions, layer.images, None, None, None,
            cache.lengths, target, backend.policy_index, scale, scores[layer.index],
            None if carried is None else gone,
        )  # fmt: skip
        if carried is not None:
            carried.scores[layer.index] = _kept_scores(scores[layer.index], before, layer, target)
    if carried is None:
        cache.finish_prompt(kept if layer_kept is None else None, layer_kept)
    else:
        cache.pruned_to(kept)


def _dropped(policy, seen: list[int], held: list[int]) -> list[int]:
    """Each row's tokens pruned before that its policy's budget counts: all those seen but not
    held, fewer where the budget would then exceed the held tokens (or keep them all)."""
    out = []
    for n, h in zip(seen, held, strict=True):
        d = n - h
        while d > 0 and (policy.budget_for(h + d).keep_all or policy.budget_for(h + d).kept > h):
            d -= 1
        out.append(d)
    return out


def _carried(carried, layer, batch: int) -> torch.Tensor:
    """A layer's scores to add a re-read to: zeros, or those its held tokens carry (the slots
    after them zeros)."""
    scores = torch.zeros(
        batch, layer.spec.kv_heads, 2, layer.keys.shape[2], device=layer.keys.device
    )
    old = None if carried is None else carried.scores.get(layer.index)
    if old is not None:
        width = min(old.shape[3], scores.shape[3])
        scores[..., :width] = old[..., :width]
    return scores


def _kept_scores(scores: torch.Tensor, before: torch.Tensor, layer, kept: torch.Tensor):
    """The scores (b, hkv, 2, slots) of the tokens a re-prune kept, at their new slots: each
    kept token found by its position among those held before (in order, per head)."""
    top = torch.iinfo(before.dtype).max
    held = before.masked_fill(before < 0, top)
    now = layer.positions.masked_fill(layer.positions < 0, top)
    slots = torch.searchsorted(held, now).clamp_max(held.shape[2] - 1)
    moved = scores.gather(3, slots[:, :, None, :].expand_as(scores))
    free = torch.arange(slots.shape[2], device=slots.device) >= kept[:, None, None]
    return moved.masked_fill(free[:, :, None, :], 0)


def _keep_recent(scores: dict, held: list[int], recent: list[int] | None) -> None:
    """Each row's last ``recent[b]`` held tokens ranked first (None: no row's)."""
    if recent is None:
        return
    for layer_scores in scores.values():
        for row, (end, count) in enumerate(zip(held, recent, strict=True)):
            layer_scores[row, ..., end - count : end] = torch.finfo(layer_scores.dtype).max


class Chunk(NamedTuple):
    embeds: torch.Tensor  # (b, width, hidden), left-padded
    padding: torch.Tensor  # (b, width) bool
    scored: torch.Tensor  # (b, width) bool: the queries whose attention scores the prompt
    is_image: torch.Tensor  # (b, width) bool


def _chunk(embeds, is_image, tokens: list, lo: int, reconstruction: Reconstruction, sep) -> Chunk:
    """Row ``b``'s real prompt tokens ``tokens[b][lo : lo + chunk]`` (positions in the
    prompt) after the separator, left-padded to the batch's widest (a row with none left is
    all padding)."""
    batch, _, hidden = embeds.shape
    take = [max(0, min(reconstruction.chunk, len(row) - lo)) for row in tokens]
    width = sep.shape[1] + max(take)
    device = embeds.device
    out = embeds.new_zeros(batch, width, hidden)
    padding = torch.ones(batch, width, dtype=torch.bool, device=device)
    scored = torch.zeros_like(padding)
    images = torch.zeros_like(padding)
    for row, count in enumerate(take):
        if not count:
            continue
        picked = tokens[row][lo : lo + count]
        out[row, width - count :] = embeds[row, picked]
        out[row, width - count - sep.shape[1] : width - count] = sep[0]
        padding[row, width - count - sep.shape[1] :] = False
        images[row, width - count :] = is_image[row, picked]
        scored[row, width - count :] = True
    if reconstruction.queries == "text":
        scored &= ~images
    return Chunk(out, padding, scored, images)


def _forward_chunk(backend: Backend, cache: PrunedCache, chunk: Chunk, after, scoring) -> None:
    """One chunk through the decoder; its tokens follow each row's prompt (``after`` (b,), the
    position after the row's last) as a next turn's would."""
    width = chunk.padding.shape[1]
    cache.phase = "reread"
    step = backend.step = backend.new_step(REREAD, cache)
    step.reread, step.padding_slots = scoring, room.padding_slots(cache, chunk.padding, width)
    if step.kernel == "flex":
        step.block_masks = room.block_masks(backend, step, width)
    steps = torch.arange(width, device=chunk.padding.device)
    positions = after[:, None] + steps - chunk.padding.sum(dim=1, keepdim=True)
    try:
        with torch.no_grad():
            backend.decoder(
                inputs_embeds=chunk.embeds, position_ids=positions, use_cache=True,
                **{backend.decoder_cache_arg: cache},
            )  # fmt: skip
    finally:
        backend.end_step()


def _separator(backend: Backend) -> torch.Tensor:
    """(1, s, hidden): what precedes each re-read chunk, the model's begin-of-text token
    (none if it has none)."""
    embed = backend.decoder.get_input_embeddings()
    bos = getattr(backend.decoder.config, "bos_token_id", None)
    ids = torch.tensor([[] if bos is None else [bos]], dtype=torch.long)
    return embed(ids.to(embed.weight.device)).detach()
