"""Question-agnostic scoring: a prompt kept whole at prefill, re-read through the decoder in
chunks to score it, then pruned in place (:func:`reread`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch

from ..ops import reprune_op
from ..policies import Reconstruction
from . import room
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
    if positions is None:
        positions = torch.arange(length, device=embeds.device).expand(batch, -1)
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
    selects with them (``csp_inductor::reprune_``)."""
    cache, policy = prompt_step.cache, backend.policy
    if prompt_step.prompt is None:
        raise RuntimeError(
            f"csp_inductor did not see the decoder's input embeddings of the prompt of "
            f"{type(backend.model).__name__}, which {policy!r} re-reads"
        )
    embeds, is_image, padding, after = prompt_step.prompt
    reconstruction = policy.reconstruction
    batch, length, _ = embeds.shape
    held = list(cache.rows)  # each row's prompt, whole
    sep = _separator(backend).to(embeds.dtype)
    everything = torch.arange(length, device=embeds.device)
    tokens = [everything] * batch if padding is None else [everything[~row] for row in padding]
    scores = {
        layer.index: torch.zeros(
            batch, layer.spec.kv_heads, 2, layer.keys.shape[2], device=embeds.device
        )
        for layer in cache.pruned
    }
    for lo in range(0, max(held), reconstruction.chunk):
        chunk = _chunk(embeds, is_image, tokens, lo, reconstruction, sep)
        scoring = Reread(scores, chunk.scored, chunk.is_image, policy, reconstruction)
        _forward_chunk(backend, cache, chunk, after, scoring)
    kept = [policy.budget_for(n).kept for n in held]
    target = torch.tensor(kept, dtype=torch.long, device=cache.lengths.device)
    for layer, scale in zip(cache.pruned, backend.scales, strict=True):
        reprune_op(
            layer.keys, layer.values, layer.positions, layer.images, None, None, None,
            cache.lengths, target, backend.policy_index, scale, scores[layer.index],
        )  # fmt: skip
    cache.finish_reread(kept)


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
