"""VisualHaystack: seeded multimodal long-context samples for KV-cache pruning benchmarks.

A sample interleaves images (real pixel arrays that go through the model's vision tower) with
short text facts, then asks a short-answer question. Every image is a ``GRID x GRID`` board of
cells; a cell is empty or holds one coloured shape, and one cell is exactly one ViT patch, so
each image becomes ``TOKENS_PER_IMAGE`` image tokens in the decoder. Every cell also carries
a thin frame whose two colours encode the image's name (``frame_code``), so the text name of an
image can be matched against its pixels by a fixed table (this keeps the tasks learnable by a
tiny model trained for minutes on a CPU: one attention hop from the question to the needle).
The answer always hangs on a few tokens far back in the prompt (the ``evidence`` positions),
which is what makes pruning the KV cache measurably hurt.

Prompt layout (word-level tokens, ``<image>`` expanded LLaVA-style)::

    <bos> image id1 id5 <image>*16 door is red . image id4 id0 <image>*16 ... QUESTION ?
    -> ANSWER <eos>

An image's name is two words (``id1 id5``); text facts are ``KEY is VALUE .``.

Tasks (``TASKS``):

* ``image_needle``  "which image has a red circle ?" -> the image's name (one cell in the whole
  prompt holds that object).
* ``text_needle``   "what is door ?" -> a passkey: the one text fact among the images whose
  value is a digit; the other facts hold colour words.
* ``cross_modal``   "what colour is the circle in id1 id5 ?" -> a colour read from the pixels of
  the image the text names (that image holds exactly one circle).
* ``comparison``    "what changed from id3 id0 to id2 id6 ?" -> "<colour> <shape>": the second
  image (shown right after the first) is the first with one cell replaced; the answer is the
  new object.

Modality of every prompt position is ``input_ids == IMAGE_TOKEN_ID``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

# the parts of the benchmark in modules of their own, reachable here as before
from csp_inductor.evaluation.batching import (
    collate,
    decode,
    position_ids,
    question_length,
    score,
    solve,
)
from csp_inductor.evaluation.boards import (
    BOS_TOKEN_ID,
    CELL,
    COLOURS,
    EOS_TOKEN_ID,
    FRAME_LEVELS,
    GRID,
    IMAGE_SIZE,
    IMAGE_TOKEN_ID,
    KEYS,
    MAX_IMAGES,
    NAME_PARTS,
    NAMES,
    NUM_CHANNELS,
    PAD_TOKEN_ID,
    PIXEL_MEAN,
    PIXEL_STD,
    SHAPES,
    SPECIAL_TOKENS,
    TOKEN_TO_ID,
    TOKENS_PER_IMAGE,
    VALUES,
    VOCAB,
    Board,
    Cell,
    frame_code,
    read_board,
    render,
)
from csp_inductor.evaluation.builtin_model import (
    BUILTIN_MODEL_PATH,
    build_processor,
    build_tokenizer,
    load_builtin_model,
)
from csp_inductor.evaluation.tasks import Question, plan_questions, random_board

__all__ = [
    "BOS_TOKEN_ID",
    "BUILTIN_MODEL_PATH",
    "CELL",
    "COLOURS",
    "DEFAULT_NUM_IMAGES",
    "EOS_TOKEN_ID",
    "FRAME_LEVELS",
    "GRID",
    "IMAGE_SIZE",
    "IMAGE_TOKEN_ID",
    "KEYS",
    "MAX_IMAGES",
    "NAMES",
    "NAME_PARTS",
    "NUM_CHANNELS",
    "PAD_TOKEN_ID",
    "PIXEL_MEAN",
    "PIXEL_STD",
    "SHAPES",
    "SPARSE_FILL",
    "SPECIAL_TOKENS",
    "TASKS",
    "TOKENS_PER_IMAGE",
    "TOKEN_TO_ID",
    "VALUES",
    "VOCAB",
    "Board",
    "Cell",
    "Sample",
    "build_processor",
    "build_tokenizer",
    "collate",
    "decode",
    "frame_code",
    "load_builtin_model",
    "make_sample",
    "make_split",
    "position_ids",
    "question_length",
    "read_board",
    "render",
    "score",
    "solve",
]

TASKS: tuple[str, ...] = ("image_needle", "text_needle", "cross_modal", "comparison")

_SPLIT_KEYS = {"train": 0, "test": 1}
# the sparse variant: most cells empty, as most patches of a photo carry little, so that a
# small cache can hold everything a question could ask about
SPARSE_FILL = 0.1
DEFAULT_NUM_IMAGES = {"train": (2, 40), "test": (8, 40)}


# --------------------------------------------------------------------------- samples


@dataclass
class Sample:
    """One VisualHaystack prompt.

    ``input_ids`` (L,) prompt ending with the question, image placeholders already expanded;
    ``pixel_values`` (num_images, 3, IMAGE_SIZE, IMAGE_SIZE) normalized with mean/std 0.5;
    ``answer_ids`` (A,) the answer tokens without ``<eos>``; ``evidence`` the prompt positions
    the answer is read from (for analysis: a pruned cache that drops them cannot answer).
    ``followups`` extra ``(question_ids, answer_ids)`` pairs about the same context, asked after
    the first answer (training only: more supervision per prompt; empty by default).
    ``focus`` (1 + len(followups),) for each question, the one prompt position its answer is
    read from: the needle cell, the passkey's value, the named image's cell, the changed cell of
    the second image (training supervises retrieval with it; -1: unknown).
    ``context_evidence`` the context positions (before the first question) that any of the
    questions reads: what an oracle keeps for a conversation about the context.
    """

    task: str
    input_ids: torch.Tensor
    pixel_values: torch.Tensor
    answer: str
    answer_ids: torch.Tensor
    evidence: torch.Tensor
    prompt: str = field(repr=False, default="")
    followups: list[tuple[torch.Tensor, torch.Tensor]] = field(repr=False, default_factory=list)
    focus: torch.Tensor = field(repr=False, default_factory=lambda: torch.tensor([-1]))
    context_evidence: torch.Tensor = field(repr=False, default_factory=lambda: torch.tensor([]))

    @property
    def num_images(self) -> int:
        return int(self.pixel_values.shape[0])

    @property
    def is_image(self) -> torch.Tensor:
        """Bool (L,): True at image-token positions."""
        return self.input_ids == IMAGE_TOKEN_ID


def _encode(words: Sequence[str]) -> list[int]:
    return [TOKEN_TO_ID[w] for w in words]


def make_sample(
    task: str,
    seed: int,
    *,
    num_images: int,
    num_facts: int | None = None,
    fill: float = 0.5,
    num_questions: int = 1,
) -> Sample:
    """Build one sample of ``task``, fully determined by ``seed`` and the keyword arguments.

    ``num_images`` in [2, 64]; ``num_facts`` text facts interleaved with the images (default:
    between 1 and 4, at least 1 for ``text_needle``); ``fill`` the chance a cell is non-empty;
    ``num_questions`` > 1 adds ``followups`` (as many as the context allows; none for
    ``text_needle``, which has one passkey) for training.
    """
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not a VisualHaystack task; allowed: {TASKS}")
    if not 2 <= num_images <= MAX_IMAGES:
        raise ValueError(f"num_images={num_images} is out of range; allowed: 2..{MAX_IMAGES}")
    if not 0.0 < fill < 1.0:
        raise ValueError(f"fill={fill} is out of range; allowed: 0 < fill < 1")
    if num_questions < 1:
        raise ValueError(f"num_questions={num_questions} is out of range; allowed: >= 1")
    rng = np.random.default_rng(
        np.random.SeedSequence([int(seed), TASKS.index(task), num_images, num_questions])
    )
    if num_facts is None:
        num_facts = int(rng.integers(1, 5))
    if not 0 <= num_facts <= len(KEYS):
        raise ValueError(f"num_facts={num_facts} is out of range; allowed: 0..{len(KEYS)}")
    if task == "text_needle" and num_facts < 1:
        raise ValueError("num_facts=0 is not allowed for task 'text_needle'; allowed: >= 1")

    names = [NAMES[i] for i in rng.permutation(len(NAMES))[:num_images]]
    boards = [random_board(rng, fill) for _ in range(num_images)]
    keys = [KEYS[i] for i in rng.permutation(len(KEYS))[:num_facts]]
    values = [list(COLOURS)[i] for i in rng.integers(len(COLOURS), size=num_facts)]
    questions = plan_questions(task, rng, names, boards, keys, values, num_questions)
    # facts go before image slot s (s == num_images: after the last image); never inside a
    # comparison pair, which must stay adjacent
    pair_seconds = {k for q in questions if task == "comparison" for k, _ in q[2][1:]}
    slots = [s for s in range(num_images + 1) if s not in pair_seconds]
    fact_slots = sorted(slots[i] for i in rng.integers(len(slots), size=num_facts).tolist())

    layout = _lay_out(names, keys, values, fact_slots)
    return _assemble(task, questions, boards, names, layout)


class _Layout(NamedTuple):
    """A prompt's context words and where its parts start: each image's name, each image's
    first image token, each fact."""

    words: list[str]
    name_pos: list[int]
    image_pos: list[int]
    fact_pos: list[int]


def _lay_out(
    names: list[str], keys: list[str], values: list[str], fact_slots: list[int]
) -> _Layout:
    """The context's words: ``<bos>``, then each image (its name, its image tokens) with the
    facts of ``fact_slots`` (sorted image slots) before the image of their slot."""
    words: list[str] = ["<bos>"]
    name_pos: list[int] = []
    image_pos: list[int] = []
    fact_pos: list[int] = []
    pending = list(fact_slots)
    facts = iter(range(len(keys)))

    def emit_facts(slot: int) -> None:
        while pending and pending[0] == slot:
            pending.pop(0)
            f = next(facts)
            fact_pos.append(len(words))
            words.extend([keys[f], "is", values[f], "."])

    for k in range(len(names)):
        emit_facts(k)
        name_pos.append(len(words) + 1)
        image_pos.append(len(words) + 3)
        words.extend(["image", *names[k].split()] + ["<image>"] * TOKENS_PER_IMAGE)
    emit_facts(len(names))
    return _Layout(words, name_pos, image_pos, fact_pos)


def _assemble(
    task: str, questions: list[Question], boards: list[Board], names: list[str], layout: _Layout
) -> Sample:
    """The sample: the context of ``layout`` with the first question appended, the others as
    followups, and the positions each question reads."""
    words, name_pos, image_pos, fact_pos = layout
    focus = [
        image_pos[cells[-1][0]] + cells[-1][1] if cells else fact_pos[asked[0]] + 2
        for _, _, cells, asked in questions
    ]

    def context_positions(cells: list[tuple[int, int]], fact_ids: list[int]) -> list[int]:
        out = [name_pos[k] + j for k, _ in cells for j in (0, 1)]
        out += [image_pos[k] + c for k, c in cells]
        return out + [p for f in fact_ids for p in range(fact_pos[f], fact_pos[f] + 3)]

    first_q, first_a, cells, fact_ids = questions[0]
    evidence = context_positions(cells, fact_ids)
    evidence += list(range(len(words), len(words) + len(first_q)))
    every = sorted({p for _, _, c, f in questions for p in context_positions(c, f)})
    words.extend(first_q)

    pixels = np.stack([render(b, n) for b, n in zip(boards, names, strict=True)])
    pixel_values = torch.from_numpy((pixels - PIXEL_MEAN) / PIXEL_STD)
    return Sample(
        task=task,
        input_ids=torch.tensor(_encode(words), dtype=torch.long),
        pixel_values=pixel_values,
        answer=" ".join(first_a),
        answer_ids=torch.tensor(_encode(first_a), dtype=torch.long),
        evidence=torch.tensor(sorted(set(evidence)), dtype=torch.long),
        prompt=" ".join(words),
        followups=[
            (torch.tensor(_encode(q), dtype=torch.long), torch.tensor(_encode(a)))
            for q, a, _, _ in questions[1:]
        ],
        focus=torch.tensor(focus, dtype=torch.long),
        context_evidence=torch.tensor(every, dtype=torch.long),
    )


def _sample_seed(split: str, seed: int, index: int) -> int:
    digest = hashlib.sha256(f"{split}/{seed}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def make_split(
    split: str,
    n: int,
    seed: int = 0,
    *,
    tasks: Sequence[str] = TASKS,
    num_images: int | tuple[int, int] | None = None,
    fill: float = 0.5,
    num_questions: int = 1,
) -> list[Sample]:
    """``n`` samples cycling through ``tasks``; train and test draw from disjoint seed streams.

    ``num_images`` an int or an inclusive ``(low, high)`` range; default
    ``DEFAULT_NUM_IMAGES[split]``. ``fill`` and ``num_questions`` as in :func:`make_sample`
    (``SPARSE_FILL``: the sparse variant).
    """
    if split not in _SPLIT_KEYS:
        raise ValueError(f"split={split!r} is unknown; allowed: {tuple(_SPLIT_KEYS)}")
    if n < 0:
        raise ValueError(f"n={n} must be >= 0")
    low, high = (
        DEFAULT_NUM_IMAGES[split]
        if num_images is None
        else (num_images, num_images)
        if isinstance(num_images, int)
        else num_images
    )
    samples = []
    for i in range(n):
        s = _sample_seed(split, seed, i)
        k = low + s % (high - low + 1)
        samples.append(
            make_sample(
                tasks[i % len(tasks)], s, num_images=k, fill=fill, num_questions=num_questions
            )
        )
    return samples
