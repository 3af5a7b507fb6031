"""Streaming a LLaVA prompt from its inputs (``prefill_chunk``): the model's own forward runs
once per chunk, so the vision tower encodes only the chunk's images and the embeddings exist
only for the chunk's tokens. Peak memory then follows the chunk, not the prompt.

A LLaVA's placeholders are one token per image feature, every image the same count, and its
positions are the cache's count (1D RoPE): a chunk that ends between images can be given its
ids, its images' pixels and the padding mask up to its end, and the model computes the rest as
for a turn. Chunks end between images (:func:`allowed_ends`); an image longer than a chunk
makes its chunk longer. Other families stream from the decoder's inputs
(:func:`.stream.stream_decoder`): the model embeds the whole prompt and encodes all its images
first (M-RoPE models compute every position from the whole prompt; others pass the decoder
inputs a chunk cannot be given a slice of).
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .stream import WHOLE_PROMPT_OUTPUTS, StreamedForward, chunk_spans, run

if TYPE_CHECKING:
    from .core import Backend
    from .step import Step

MODEL_TYPES = ("llava",)  # whose prompts stream from their inputs
# the forward's arguments a chunk is given its part of; any other tensor: the decoder streams
SPLIT = ("input_ids", "pixel_values", "attention_mask", "position_ids", "cache_position")


class StreamedModelForward(StreamedForward):
    """The model's forward: a streaming step's prompt in chunks from its inputs, when the model
    and its inputs allow it (:func:`image_counts`); any other forward by the model's own (whose
    decoder then streams the prompt if it is a streaming step's)."""

    def __init__(self, backend: Backend, forward, signature: inspect.Signature):
        super().__init__(backend, forward, signature)
        # what generate inspects: without mm_encoder_outputs it does not encode every image
        # before the forward (transformers >= 5.25) but passes the pixels, for each chunk's own
        offered = [p for name, p in signature.parameters.items() if name != "mm_encoder_outputs"]
        self.__signature__ = signature.replace(parameters=offered)

    def stream(self, step: Step, kwargs: dict):
        counts = image_counts(self.backend, kwargs)
        if counts is None:
            return self.forward(**kwargs)
        return stream_model(self.backend, step, self.forward, kwargs, counts)


def streams_inputs(model) -> bool:
    """Whether ``model``'s prompts can stream from its inputs."""
    return getattr(model.config, "model_type", None) in MODEL_TYPES


def image_counts(backend: Backend, kwargs: dict) -> tuple[Tensor, int] | None:
    """(batch, length + 1) each row's image tokens before each place, and the tokens per image;
    None when the inputs cannot stream (given as embeddings or encoded images, other tensors
    beside them, images of different sizes, outputs asked for over the whole prompt)."""
    ids, pixels = kwargs.get("input_ids"), kwargs.get("pixel_values")
    given = (kwargs.get(name) is not None for name in ("inputs_embeds", "mm_encoder_outputs"))
    if not isinstance(ids, Tensor) or any(given):
        return None
    if any(kwargs.get(name) for name in WHOLE_PROMPT_OUTPUTS):
        return None  # (the decoder refuses them)
    if any(isinstance(v, Tensor) for k, v in kwargs.items() if k not in SPLIT):
        return None
    is_image = ids == backend.model.config.image_token_id
    counts = torch.nn.functional.pad(is_image.cumsum(dim=1), (1, 0))
    images = 0 if pixels is None else pixels.shape[0]
    total = int(counts[:, -1].sum())
    if (images == 0) != (total == 0) or (images and total % images):
        return None  # (the model raises its own error for a mismatch)
    return counts, max(1, total // max(1, images))


def stream_model(backend: Backend, outer: Step, forward, kwargs: dict, counts):
    """The model's forward of ``outer``'s prompt, chunk by chunk, each chunk given its ids, its
    images' pixels and the padding mask up to its end. Its output is the last chunk's, with the
    logits of the whole prompt (or of the last chunk when the model keeps only positions inside
    it, as ``generate`` does)."""
    inputs = outer.stream.inputs
    counts, per_image = counts
    allowed = (counts % per_image == 0).all(dim=0)
    spans = chunk_spans(inputs.q_len, backend.options.prefill_chunk, inputs.mask, allowed)
    # image b's pixels: each row's images in order, rows one after another
    first_image = torch.nn.functional.pad((counts[:, -1] // per_image).cumsum(dim=0), (1, 0))

    def forward_chunk(step: Step, lo: int, hi: int, last_only: bool):
        chunk = dict(kwargs, input_ids=kwargs["input_ids"][:, lo:hi])
        chunk["attention_mask"] = None if inputs.mask is None else inputs.mask[:, :hi]
        for name in ("position_ids", "cache_position"):
            if isinstance(kwargs.get(name), Tensor):
                chunk[name] = kwargs[name][..., lo:hi]
        if kwargs.get("pixel_values") is not None:
            chunk["pixel_values"] = _chunk_pixels(kwargs["pixel_values"], counts, per_image,
                                                  first_image, lo, hi)  # fmt: skip
        if last_only and hi < inputs.q_len:
            chunk["logits_to_keep"] = 1  # (not kept: only the last chunk's are needed)
        return forward(**chunk)

    return run(backend, outer, spans, forward_chunk, "logits")


def _chunk_pixels(pixels: Tensor, counts: Tensor, per_image: int, first_image, lo: int, hi: int):
    """The pixels of the images whose tokens are in ``[lo, hi)`` (None: none), in the order
    the model's placeholders take them (row by row)."""
    rows = [
        torch.arange(int(counts[b, lo]) // per_image, int(counts[b, hi]) // per_image)
        + first_image[b]
        for b in range(counts.shape[0])
    ]
    index = torch.cat(rows)
    return pixels[index.to(pixels.device)] if len(index) else None
