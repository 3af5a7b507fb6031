"""Batches and answers of VisualHaystack samples: left-padded collation (with answer labels for
training), positions, decoding, exact-match scoring, and an oracle that answers from a sample's
content alone."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from csp_inductor.evaluation.boards import (
    BOS_TOKEN_ID,
    EOS_TOKEN_ID,
    PAD_TOKEN_ID,
    TOKEN_TO_ID,
    TOKENS_PER_IMAGE,
    VOCAB,
    read_board,
)

if TYPE_CHECKING:
    from csp_inductor.evaluation.haystack import Sample


def collate(samples: Sequence[Sample], *, with_answers: bool = False) -> dict[str, torch.Tensor]:
    """Left-pad a batch.

    Returns ``input_ids`` / ``attention_mask`` (batch, L_max) with ``PAD_TOKEN_ID`` / 0 on the
    left, and ``pixel_values`` (total_images, 3, H, W) concatenated in batch order (LLaVA fills
    image tokens in row-major order). With ``with_answers`` every row is prompt + answer +
    ``<eos>`` (+ each followup question, answer, ``<eos>``) and ``labels`` (batch, L_max) holds
    -100 except on answer and ``<eos>`` tokens, aligned with ``input_ids`` (shift by one to
    train next-token prediction).
    """
    if not samples:
        raise ValueError("collate() got an empty batch")
    rows, label_rows = [], []
    for s in samples:
        if with_answers:
            eos = torch.tensor([EOS_TOKEN_ID])
            parts, labels = [s.input_ids], [torch.full_like(s.input_ids, -100)]
            for i, (q, a) in enumerate([(None, s.answer_ids), *s.followups]):
                if i:
                    parts.append(q)
                    labels.append(torch.full_like(q, -100))
                parts += [a, eos]
                labels += [a, eos]
            rows.append(torch.cat(parts))
            label_rows.append(torch.cat(labels))
        else:
            rows.append(s.input_ids)
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), PAD_TOKEN_ID, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, length - len(r) :] = r
        attention_mask[i, length - len(r) :] = 1
        if with_answers:
            labels[i, length - len(r) :] = label_rows[i]
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values": torch.cat([s.pixel_values for s in samples]),
    }
    if with_answers:
        batch["labels"] = labels
    return batch


def decode(ids: Sequence[int] | torch.Tensor) -> str:
    """Token ids -> text, stopping at ``<eos>`` and dropping padding / ``<bos>``."""
    words = []
    for i in torch.as_tensor(ids).tolist():
        if i == EOS_TOKEN_ID:
            break
        if i in (PAD_TOKEN_ID, BOS_TOKEN_ID):
            continue
        words.append(VOCAB[i] if 0 <= i < len(VOCAB) else "<unk>")
    return " ".join(words)


def score(prediction: str | Sequence[int] | torch.Tensor, sample: Sample) -> bool:
    """Exact match of a generated answer (text, or the new token ids) against ``sample``."""
    if isinstance(prediction, str):
        text = re.sub(r"<eos>.*", "", prediction, flags=re.S)
        text = text.replace("<pad>", " ").replace("<bos>", " ")
    else:
        text = decode(prediction)
    return " ".join(text.split()) == sample.answer


def question_length(sample: Sample) -> int:
    """Tokens of the prompt's trailing question, from its "which"/"what" to the "?"."""
    ids = sample.input_ids.tolist()
    starts = (TOKEN_TO_ID["which"], TOKEN_TO_ID["what"])
    return len(ids) - max(i for i, t in enumerate(ids) if t in starts)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions of a left-padded batch (batch, L), numbered as ``generate`` numbers them."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def solve(sample: Sample) -> str:
    """Answer a sample from its content alone (prompt tokens + decoded pixels).

    The oracle behind the "each task is answerable" tests; it reads boards from pixels, never
    from generator state.
    """
    words = [VOCAB[i] for i in sample.input_ids.tolist()]
    q_start = len(words) - question_length(sample)
    context = words[:q_start]
    names = [" ".join(context[i + 1 : i + 3]) for i, w in enumerate(context) if w == "image"]
    boards = dict(zip(names, (read_board(p) for p in sample.pixel_values), strict=True))
    q = words[q_start:-1]
    if q[0] == "which":
        obj = (q[4], q[5])
        hits = [n for n, b in boards.items() if obj in b]
        return hits[0] if len(hits) == 1 else ""
    if q[1] == "colour":
        shape, name = q[4], " ".join(q[6:8])
        hits = [c[0] for c in boards[name] if c is not None and c[1] == shape]
        return hits[0] if len(hits) == 1 else ""
    if q[1] == "changed":
        a, b = boards[" ".join(q[3:5])], boards[" ".join(q[6:8])]
        diff = [j for j in range(TOKENS_PER_IMAGE) if a[j] != b[j]]
        return " ".join(b[diff[0]]) if len(diff) == 1 and b[diff[0]] is not None else ""
    key = q[2]
    facts = [context[i + 2] for i, w in enumerate(context) if w == key]
    return facts[0] if len(facts) == 1 else ""
