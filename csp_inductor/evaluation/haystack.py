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
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

TASKS: tuple[str, ...] = ("image_needle", "text_needle", "cross_modal", "comparison")

CELL = 8  # pixels per cell side == the vision tower's patch size
GRID = 4  # cells per image side
IMAGE_SIZE = CELL * GRID
TOKENS_PER_IMAGE = GRID * GRID
NUM_CHANNELS = 3
PIXEL_MEAN = 0.5
PIXEL_STD = 0.5

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "cyan": (0.0, 1.0, 1.0),
    "magenta": (1.0, 0.0, 1.0),
}
SHAPES: tuple[str, ...] = ("square", "circle", "triangle", "cross")
# Every cell of an image carries its image's name as a two-colour frame code (top/left edge,
# bottom/right edge; 7 x 7 codes), so a text name maps to pixels by a fixed table.
FRAME_LEVELS: tuple[tuple[float, float, float], ...] = tuple(
    (0.4 * r, 0.4 * g, 0.4 * b) for r in (0, 1) for g in (0, 1) for b in (0, 1) if r or g or b
)
NAME_PARTS: tuple[str, ...] = tuple(f"id{i}" for i in range(len(FRAME_LEVELS)))
NAMES: tuple[str, ...] = tuple(f"{a} {b}" for a in NAME_PARTS for b in NAME_PARTS)  # 2 words
KEYS: tuple[str, ...] = (
    "door", "river", "lamp", "stone", "cloud", "forest", "bridge", "tower",
    "garden", "window", "market", "harbor", "valley", "castle", "mirror", "candle",
)  # fmt: skip
VALUES: tuple[str, ...] = tuple(str(i) for i in range(10))
MAX_IMAGES = len(NAMES)

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<unk>", "<bos>", "<eos>", "<image>")
_WORDS: tuple[str, ...] = (
    "image", "is", ".", "?", "which", "has", "a", "what", "colour", "the", "in", "changed",
    "from", "to",
)  # fmt: skip
VOCAB: tuple[str, ...] = (
    SPECIAL_TOKENS + _WORDS + tuple(COLOURS) + SHAPES + NAME_PARTS + KEYS + VALUES
)
TOKEN_TO_ID: dict[str, int] = {tok: i for i, tok in enumerate(VOCAB)}
PAD_TOKEN_ID = TOKEN_TO_ID["<pad>"]
BOS_TOKEN_ID = TOKEN_TO_ID["<bos>"]
EOS_TOKEN_ID = TOKEN_TO_ID["<eos>"]
IMAGE_TOKEN_ID = TOKEN_TO_ID["<image>"]

BUILTIN_MODEL_PATH = Path(__file__).parents[1] / "assets" / "tiny_llava"

_SPLIT_KEYS = {"train": 0, "test": 1}
# the sparse variant: most cells empty, as most patches of a photo carry little, so that a
# small cache can hold everything a question could ask about
SPARSE_FILL = 0.1
DEFAULT_NUM_IMAGES = {"train": (2, 40), "test": (8, 40)}


# --------------------------------------------------------------------------- drawing


def _shape_masks() -> dict[str, np.ndarray]:
    """Boolean ``(CELL, CELL)`` masks, one per shape, with a one-pixel margin."""
    yy, xx = np.mgrid[0:CELL, 0:CELL].astype(np.float32)
    c = (CELL - 1) / 2
    inner = (yy >= 1) & (yy <= CELL - 2) & (xx >= 1) & (xx <= CELL - 2)
    square = inner
    circle = (yy - c) ** 2 + (xx - c) ** 2 <= (CELL / 2 - 1) ** 2
    # apex at the top, base on the bottom row of the inner box
    half_width = (yy - 1) / (CELL - 3) * (CELL / 2 - 1)
    triangle = inner & (np.abs(xx - c) <= half_width + 0.01)
    bar = 0.5  # two-pixel-wide bars
    cross = inner & ((np.abs(yy - c) <= bar) | (np.abs(xx - c) <= bar))
    return {"square": square, "circle": circle, "triangle": triangle, "cross": cross}


_MASKS = _shape_masks()
_COLOUR_RGB = {k: np.asarray(v, dtype=np.float32) for k, v in COLOURS.items()}

Cell = tuple[str, str] | None  # (colour, shape) or empty
Board = list[Cell]  # GRID*GRID cells, row-major


def frame_code(name: str) -> tuple[int, int]:
    """The two frame-colour indices that mark every cell of the image called ``name``."""
    return divmod(NAMES.index(name), len(FRAME_LEVELS))


def render(board: Board, name: str | None = None) -> np.ndarray:
    """Draw a board as a float32 ``(3, IMAGE_SIZE, IMAGE_SIZE)`` image in ``[0, 1]``.

    With ``name``, every cell gets a one-pixel frame in the name's code (intensity 0.4, below
    the shapes' 1.0): top/left edges in the first colour, bottom/right in the second.
    """
    img = np.zeros((NUM_CHANNELS, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    for idx, cell in enumerate(board):
        r, c = divmod(idx, GRID)
        patch = img[:, r * CELL : (r + 1) * CELL, c * CELL : (c + 1) * CELL]
        if name is not None:
            first, second = (np.asarray(FRAME_LEVELS[i], np.float32) for i in frame_code(name))
            patch[:, 0, :] = first[:, None]
            patch[:, :, 0] = first[:, None]
            patch[:, CELL - 1, 1:] = second[:, None]
            patch[:, 1:, CELL - 1] = second[:, None]
        if cell is not None:
            colour, shape = cell
            patch[:, _MASKS[shape]] = _COLOUR_RGB[colour][:, None]
    return img


def read_board(pixel_values: torch.Tensor) -> Board:
    """Decode one normalized image ``(3, H, W)`` back into its cells (inverse of ``render``)."""
    img = (pixel_values.detach().float().cpu().numpy() * PIXEL_STD) + PIXEL_MEAN
    board: Board = []
    for idx in range(TOKENS_PER_IMAGE):
        r, c = divmod(idx, GRID)
        patch = img[:, r * CELL : (r + 1) * CELL, c * CELL : (c + 1) * CELL]
        lit = patch.max(axis=0) > 0.7  # shapes are 1.0, frames 0.4
        if not lit.any():
            board.append(None)
            continue
        shape = next((s for s, m in _MASKS.items() if np.array_equal(m, lit)), None)
        rgb = patch[:, lit].mean(axis=1)
        colour = min(_COLOUR_RGB, key=lambda k: float(np.abs(_COLOUR_RGB[k] - rgb).sum()))
        board.append((colour, shape) if shape is not None else None)
    return board


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


def _random_board(rng: np.random.Generator, fill: float) -> Board:
    colours, shapes = list(COLOURS), list(SHAPES)
    return [
        (colours[rng.integers(len(colours))], shapes[rng.integers(len(shapes))])
        if rng.random() < fill
        else None
        for _ in range(TOKENS_PER_IMAGE)
    ]


def _random_object(rng: np.random.Generator) -> tuple[str, str]:
    return list(COLOURS)[rng.integers(len(COLOURS))], SHAPES[rng.integers(len(SHAPES))]


def _other_object(rng: np.random.Generator, avoid: Sequence[Cell]) -> tuple[str, str]:
    while True:
        obj = _random_object(rng)
        if obj not in avoid:
            return obj


def _encode(words: Sequence[str]) -> list[int]:
    return [TOKEN_TO_ID[w] for w in words]


# (question words, answer words, [(image index, cell index)] or [fact index])
_Question = tuple[list[str], list[str], list[tuple[int, int]], list[int]]


def _plan_questions(
    task: str,
    rng: np.random.Generator,
    names: list[str],
    boards: list[Board],
    keys: list[str],
    values: list[str],
    num_questions: int,
) -> list[_Question]:
    """Edit ``boards`` in place so each question has exactly one answer; return the questions."""
    num_images = len(boards)
    questions: list[_Question] = []
    if task == "image_needle":
        objects: list[tuple[str, str]] = []
        while len(objects) < min(num_questions, len(COLOURS) * len(SHAPES)):
            obj = _random_object(rng)
            if obj not in objects:
                objects.append(obj)
        for b in boards:
            for i, cell in enumerate(b):
                if cell in objects:
                    b[i] = _other_object(rng, objects)
        spots = rng.permutation(num_images * TOKENS_PER_IMAGE)[: len(objects)]
        for obj, spot in zip(objects, spots.tolist(), strict=True):
            k, c = divmod(spot, TOKENS_PER_IMAGE)
            boards[k][c] = obj
            question = ["which", "image", "has", "a", *obj, "?"]
            questions.append((question, names[k].split(), [(k, c)], []))
    elif task == "text_needle":
        # a passkey: the one fact whose value is a digit (the others hold colour words)
        f = int(rng.integers(len(keys)))
        values[f] = VALUES[rng.integers(len(VALUES))]
        questions.append((["what", "is", keys[f], "?"], [values[f]], [], [f]))
    elif task == "cross_modal":
        for k in rng.permutation(num_images)[:num_questions].tolist():
            shape = SHAPES[rng.integers(len(SHAPES))]
            b = boards[k]
            for i, cell in enumerate(b):
                if cell is not None and cell[1] == shape:
                    b[i] = None
            c = int(rng.integers(TOKENS_PER_IMAGE))
            colour = list(COLOURS)[rng.integers(len(COLOURS))]
            b[c] = (colour, shape)
            question = ["what", "colour", "is", "the", shape, "in", *names[k].split(), "?"]
            questions.append((question, [colour], [(k, c)], []))
    else:  # comparison: disjoint adjacent pairs (k-1, k), the second a one-cell edit
        seconds = [k for k in rng.permutation(num_images).tolist() if k >= 1]
        used: set[int] = set()
        for k in seconds:
            if len(questions) == num_questions:
                break
            if k in used or k - 1 in used:
                continue
            used.update((k - 1, k))
            c = int(rng.integers(TOKENS_PER_IMAGE))
            boards[k] = list(boards[k - 1])
            boards[k][c] = _other_object(rng, [boards[k - 1][c]])
            question = ["what", "changed", "from", *names[k - 1].split(), "to", *names[k].split()]
            question.append("?")
            questions.append((question, list(boards[k][c]), [(k - 1, c), (k, c)], []))
    return questions


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
    boards = [_random_board(rng, fill) for _ in range(num_images)]
    keys = [KEYS[i] for i in rng.permutation(len(KEYS))[:num_facts]]
    values = [list(COLOURS)[i] for i in rng.integers(len(COLOURS), size=num_facts)]
    questions = _plan_questions(task, rng, names, boards, keys, values, num_questions)
    # facts go before image slot s (s == num_images: after the last image); never inside a
    # comparison pair, which must stay adjacent
    pair_seconds = {k for q in questions if task == "comparison" for k, _ in q[2][1:]}
    slots = [s for s in range(num_images + 1) if s not in pair_seconds]
    fact_slots = sorted(slots[i] for i in rng.integers(len(slots), size=num_facts).tolist())

    words: list[str] = ["<bos>"]
    name_pos: list[int] = []
    image_pos: list[int] = []
    fact_pos: list[int] = []
    pending = list(fact_slots)
    facts = iter(range(num_facts))

    def emit_facts(slot: int) -> None:
        while pending and pending[0] == slot:
            pending.pop(0)
            f = next(facts)
            fact_pos.append(len(words))
            words.extend([keys[f], "is", values[f], "."])

    for k in range(num_images):
        emit_facts(k)
        name_pos.append(len(words) + 1)
        image_pos.append(len(words) + 3)
        words.extend(["image", *names[k].split()] + ["<image>"] * TOKENS_PER_IMAGE)
    emit_facts(num_images)

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


# --------------------------------------------------------------------------- batching, scoring


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


def build_tokenizer():
    """A word-level ``PreTrainedTokenizerFast`` over ``VOCAB`` (ids equal ``TOKEN_TO_ID``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=dict(TOKEN_TO_ID), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
    )


def load_builtin_model(path: str | Path = BUILTIN_MODEL_PATH, *, tp_plan: str | None = None):
    """The shipped tiny LLaVA trained on VisualHaystack (offline, eval mode, fp32).
    ``tp_plan="auto"``: split over the processes of a ``torchrun`` launch by transformers'
    tensor parallelism (needs ``accelerate``: ``pip install csp_inductor[distributed]``)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText
    from transformers.utils import logging

    from csp_inductor.compat import BEFORE_5_3
    from csp_inductor.distributed import tp_loading

    # transformers < 5.3 nests SigLIP one level deeper: its loading report would list the
    # vision tower's weights as missing; they are loaded (strictly) below, anything else missing
    # raises
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    if BEFORE_5_3:
        logging.set_verbosity_error()
    logging.disable_progress_bar()  # (42 tensors load in milliseconds)
    try:
        model, info = AutoModelForImageTextToText.from_pretrained(
            str(path), local_files_only=True, output_loading_info=True,
            **({} if tp_plan is None else tp_loading(tp_plan)),
        )  # fmt: skip
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()
    tower = model.model.vision_tower
    missing = [k for k in info["missing_keys"] if not k.startswith("model.vision_tower.")]
    if missing or (info["missing_keys"] and not hasattr(tower, "vision_model")):
        raise ValueError(f"the built-in model at {path} lacks weights: {info['missing_keys']}")
    if hasattr(tower, "vision_model"):
        weights = load_file(str(Path(path) / "model.safetensors"))
        prefix = "vision_tower."
        tower.vision_model.load_state_dict(
            {k.removeprefix(prefix): v for k, v in weights.items() if k.startswith(prefix)}
        )
    return model.eval()


def build_processor():
    """A ``LlavaProcessor`` (PIL image backend, no torchvision) matching the generator: RGB
    images of ``IMAGE_SIZE`` pixels, normalized with mean/std 0.5, one ``<image>`` in the text
    expanded to ``TOKENS_PER_IMAGE`` placeholders."""
    from transformers import LlavaProcessor
    from transformers.image_utils import PILImageResampling

    try:
        from transformers.models.llava.image_processing_pil_llava import (
            LlavaImageProcessorPil as ImageProcessor,
        )
    except ImportError:  # transformers < 5.3: the PIL processor is the default one
        from transformers import LlavaImageProcessor as ImageProcessor

    image_processor = ImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=False,
        resample=PILImageResampling.NEAREST,
        image_mean=[PIXEL_MEAN] * NUM_CHANNELS,
        image_std=[PIXEL_STD] * NUM_CHANNELS,
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        patch_size=CELL,
        vision_feature_select_strategy="full",
    )
