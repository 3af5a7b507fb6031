"""The built-in model's training objective: the answer loss and the auxiliary losses that the
training recipe (:mod:`csp_inductor.evaluation.train`, which says why) adds to it: linear probes
of the decoder's hidden states, discarded at export, and one attention head's retrieval
supervised towards each question's ``focus``."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import rotate_half

from csp_inductor.evaluation import haystack as hs
from csp_inductor.evaluation.boards import _MASKS

CELL_LAYER = 1  # decoder layer whose output predicts each image token's own cell
PREVIOUS_LAYER = 2  # ... and the same cell of the previous image
QUESTION_LAYER = 1  # ... and, at every "?", the question's last QUESTION_SPAN tokens
QUESTION_SPAN = 7
RETRIEVAL_LAYER = 2  # one head of this layer is taught to attend from "?" to the needle
RETRIEVED_LAYER = RETRIEVAL_LAYER + 1  # its output predicts the contents of the needle cell
_SHAPE_MASKS = torch.stack([torch.from_numpy(_MASKS[s]) for s in hs.SHAPES])
_COLOUR_RGB = torch.tensor(list(hs.COLOURS.values()))
_FRAME_RGB = torch.tensor(hs.FRAME_LEVELS)


def cell_labels(pixel_values: torch.Tensor) -> torch.Tensor:
    """Class labels of every cell, read from pixels (a vectorized ``hs.read_board``).

    ``pixel_values`` (num_images, 3, IMAGE_SIZE, IMAGE_SIZE) normalized; returns a long tensor
    (num_images, TOKENS_PER_IMAGE, 4): colour (0 empty, 1 + index in ``COLOURS``), shape
    (0 empty, 1 + index in ``SHAPES``) and the two frame-code colours (indices into
    ``FRAME_LEVELS``).
    """
    n, g, c = pixel_values.shape[0], hs.GRID, hs.CELL
    img = pixel_values.float() * hs.PIXEL_STD + hs.PIXEL_MEAN
    cells = img.reshape(n, 3, g, c, g, c).permute(0, 2, 4, 1, 3, 5).reshape(n, g * g, 3, c, c)
    lit = cells.amax(dim=2) > 0.7  # shapes are drawn at 1.0, frames at 0.4
    match = (lit[:, :, None] == _SHAPE_MASKS).flatten(-2).all(-1)  # (n, cells, shapes)
    shape = torch.where(match.any(-1), match.int().argmax(-1) + 1, 0)
    rgb = (cells * lit[:, :, None]).sum((-1, -2)) / lit.sum((-1, -2)).clamp(min=1)[..., None]
    colour = (rgb[:, :, None] - _COLOUR_RGB).abs().sum(-1).argmin(-1) + 1
    colour = torch.where(shape > 0, colour, 0)
    mid = c // 2  # the frame's first colour runs along the top edge, its second along the bottom
    frames = [
        (cells[:, :, :, row, mid, None] - _FRAME_RGB.T).abs().sum(2).argmin(-1)
        for row in (0, c - 1)
    ]
    return torch.stack([colour, shape, *frames], dim=-1)


class AuxiliaryProbes(nn.Module):
    """Linear read-outs of decoder hidden states, trained with the model and then discarded.

    ``loss`` takes the decoder's ``hidden_states`` (tuple of (batch, seq, hidden), index 0 the
    embeddings), the batch's ``input_ids`` (batch, seq), ``pixel_values``, the number of
    images of each sample (to find each image's predecessor within its own prompt) and the
    retrieval ``queries`` ``(rows, cols, targets)`` of :func:`retrieval_queries`.
    """

    def __init__(self, hidden: int, vocab: int):
        super().__init__()
        classes = (
            len(hs.COLOURS) + 1,
            len(hs.SHAPES) + 1,
            len(hs.FRAME_LEVELS),
            len(hs.FRAME_LEVELS),
        )
        self.cell = nn.ModuleList(nn.Linear(hidden, k) for k in classes)
        self.previous = nn.ModuleList(nn.Linear(hidden, k) for k in classes[:2])
        self.retrieved = nn.ModuleList(nn.Linear(hidden, k) for k in classes)
        self.question = nn.ModuleList(nn.Linear(hidden, vocab) for _ in range(QUESTION_SPAN))

    def loss(
        self, hidden_states, input_ids, pixel_values, images_per_sample, queries
    ) -> torch.Tensor:
        labels = cell_labels(pixel_values)  # (images, cells, 4), images in batch order
        first = torch.zeros(len(labels), dtype=torch.bool)
        first[torch.tensor(images_per_sample).cumsum(0)[:-1]] = True
        first[0] = True
        previous = torch.roll(labels[:, :, :2], 1, dims=0).masked_fill(first[:, None, None], -100)
        labels, previous = labels.flatten(0, 1), previous.flatten(0, 1)
        is_image = input_ids == hs.IMAGE_TOKEN_ID  # row-major order == batch order of images
        h_cell = hidden_states[CELL_LAYER][is_image]
        h_prev = hidden_states[PREVIOUS_LAYER][is_image]
        total = sum(F.cross_entropy(head(h_cell), labels[:, i]) for i, head in enumerate(self.cell))
        total = total + sum(
            F.cross_entropy(head(h_prev), previous[:, i], ignore_index=-100)
            for i, head in enumerate(self.previous)
        )
        rows, cols = (input_ids == hs.TOKEN_TO_ID["?"]).nonzero(as_tuple=True)
        h_q = hidden_states[QUESTION_LAYER][rows, cols]
        for offset, head in enumerate(self.question, start=1):
            target = input_ids[rows, (cols - offset).clamp(min=0)]
            total = total + 0.5 * F.cross_entropy(head(h_q), target)
        rows, cols, targets = queries
        on_image = is_image[rows, targets]
        if not on_image.any():  # e.g. a batch of one text_needle prompt
            return total
        rows, cols, targets = rows[on_image], cols[on_image], targets[on_image]
        cell = is_image.flatten().cumsum(0)[rows * is_image.shape[1] + targets] - 1
        h_r = hidden_states[RETRIEVED_LAYER][rows, cols]
        return total + sum(
            F.cross_entropy(head(h_r), labels[cell, i]) for i, head in enumerate(self.retrieved)
        )


def retrieval_queries(batch, samples: list[hs.Sample]):
    """Where retrieval is supervised: every ``?`` (it predicts the first answer token) and, for
    two-token answers, the first answer token too (it predicts the second, which needs the
    needle again). Returns ``(rows, cols, targets)``: the query positions and their questions'
    ``focus``, all in the batch's (left-padded) positions."""
    input_ids, mask = batch["input_ids"], batch["attention_mask"]
    rows, cols = (input_ids == hs.TOKEN_TO_ID["?"]).nonzero(as_tuple=True)
    focus = torch.cat([s.focus for s in samples]) + (mask == 0).sum(1)[rows]
    answers = [len(a) for s in samples for a in (s.answer_ids, *(a for _, a in s.followups))]
    longer = torch.tensor(answers) > 1
    return (
        torch.cat([rows, rows[longer]]),
        torch.cat([cols, cols[longer] + 1]),
        torch.cat([focus, focus[longer]]),
    )


def retrieval_loss(model, hidden_states, batch, queries) -> torch.Tensor:
    """Cross-entropy of one attention head's distribution at every query of
    :func:`retrieval_queries` against its question's ``focus`` position (the needle the answer
    is read from).

    The head is query head 0 (KV head 0) of decoder layer ``RETRIEVAL_LAYER``, recomputed from
    that layer's input exactly as the model computes it (norm, projections, RoPE at the batch's
    positions, causal and padding masks), so the supervision shapes the model's own retrieval.
    """
    text = model.model.language_model
    attn = text.layers[RETRIEVAL_LAYER].self_attn
    h = text.layers[RETRIEVAL_LAYER].input_layernorm(hidden_states[RETRIEVAL_LAYER])
    mask = batch["attention_mask"]
    cos, sin = text.rotary_emb(h, hs.position_ids(mask))
    rows, cols, target = queries
    d = attn.head_dim
    q, k = attn.q_proj(h[rows, cols])[:, :d], attn.k_proj(h)[..., :d]
    q = q * cos[rows, cols] + rotate_half(q) * sin[rows, cols]
    k = k * cos + rotate_half(k) * sin
    logits = torch.einsum("nd,nld->nl", q, k[rows]) * attn.scaling
    positions = torch.arange(h.shape[1])
    allowed = (positions <= cols[:, None]) & mask[rows].bool()
    return F.cross_entropy(logits.masked_fill(~allowed, -math.inf), target)


def training_loss(model, probes: AuxiliaryProbes | None, batch, samples: list[hs.Sample]):
    """``(answer loss, auxiliary loss, answer-token accuracy)`` of one batch.

    The answer loss is the cross-entropy on answer + ``<eos>`` tokens, averaged per prompt and
    then over prompts (the accuracy too); the auxiliary loss is zero without ``probes``.
    """
    mask = batch["attention_mask"]
    out = model(
        input_ids=batch["input_ids"],
        pixel_values=batch["pixel_values"],
        attention_mask=mask,
        position_ids=hs.position_ids(mask),
        output_hidden_states=probes is not None,
    )
    labels = batch["labels"]
    logits, target = out.logits[:, :-1].float(), labels[:, 1:]
    labelled = target != -100
    # every prompt weighs the same, however many questions it carries: otherwise the tasks
    # with many follow-ups (image_needle) drown the single-question ones (text_needle)
    per_row = labelled.sum(1, keepdim=True).clamp(min=1)
    weight = (labelled / per_row)[labelled] / labels.shape[0]
    loss = (F.cross_entropy(logits[labelled], target[labelled], reduction="none") * weight).sum()
    answer = labelled & (target != hs.EOS_TOKEN_ID)
    right = ((logits.argmax(-1) == target) & answer).sum(1) / answer.sum(1).clamp(min=1)
    aux = torch.zeros(())
    if probes is not None:
        images_per_sample = [s.num_images for s in samples]
        queries = retrieval_queries(batch, samples)
        aux = probes.loss(
            out.hidden_states, batch["input_ids"], batch["pixel_values"], images_per_sample, queries
        ) + retrieval_loss(model, out.hidden_states, batch, queries)
    return loss, aux, right.mean()
