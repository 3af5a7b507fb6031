"""VisualHaystack: seeded multimodal long-context samples for KV-cache pruning benchmarks.

A sample interleaves images (real pixel arrays that go through the model's vision tower) with
short text facts, then asks a short-answer question. Every image is a ``GRID x GRID`` board of
cells; a cell is empty or holds one coloured shape, and one cell is exactly one ViT patch, so
each image becomes ``TOKENS_PER_IMAGE`` image tokens in the decoder. The answer always hangs on
a few tokens far back in the prompt (the ``evidence`` positions), which is what makes pruning
the KV cache measurably hurt.

Prompt layout (word-level tokens, ``<image>`` expanded LLaVA-style)::

    <bos> image pic12 <image>*16 key7 is val3 . image pic40 <image>*16 ... QUESTION ? | ANSWER <eos>

Tasks (``TASKS``):

* ``image_needle``  "which image has a red circle ?" -> the image's name (one cell in the whole
  prompt holds that object).
* ``text_needle``   "what is door ?" -> the value of one text fact among the images.
* ``cross_modal``   "what colour is the circle in pic12 ?" -> a colour read from the pixels of
  the image the text names (that image holds exactly one circle).
* ``comparison``    "what changed from pic3 to pic9 ?" -> "<colour> <shape>": pic9 (shown right
  after pic3) is pic3 with one cell replaced; the answer is the new object.

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
NAMES: tuple[str, ...] = tuple(f"pic{i}" for i in range(64))
KEYS: tuple[str, ...] = (
    "door", "river", "lamp", "stone", "cloud", "forest", "bridge", "tower",
    "garden", "window", "market", "harbor", "valley", "castle", "mirror", "candle",
)  # fmt: skip
VALUES: tuple[str, ...] = tuple(f"val{i}" for i in range(32))
MAX_IMAGES = len(NAMES)

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<unk>", "<bos>", "<eos>", "<image>")
_WORDS: tuple[str, ...] = (
    "image", "is", ".", "?", "which", "has", "a", "what", "colour", "the", "in", "changed",
    "from", "to",
)  # fmt: skip
VOCAB: tuple[str, ...] = SPECIAL_TOKENS + _WORDS + tuple(COLOURS) + SHAPES + NAMES + KEYS + VALUES
TOKEN_TO_ID: dict[str, int] = {tok: i for i, tok in enumerate(VOCAB)}
PAD_TOKEN_ID = TOKEN_TO_ID["<pad>"]
BOS_TOKEN_ID = TOKEN_TO_ID["<bos>"]
EOS_TOKEN_ID = TOKEN_TO_ID["<eos>"]
IMAGE_TOKEN_ID = TOKEN_TO_ID["<image>"]

BUILTIN_MODEL_PATH = Path(__file__).parent / "assets" / "tiny_llava"

_SPLIT_KEYS = {"train": 0, "test": 1}
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


def render(board: Board) -> np.ndarray:
    """Draw a board as a float32 ``(3, IMAGE_SIZE, IMAGE_SIZE)`` image in ``[0, 1]``."""
    img = np.zeros((NUM_CHANNELS, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    for idx, cell in enumerate(board):
        if cell is None:
            continue
        colour, shape = cell
        r, c = divmod(idx, GRID)
        patch = img[:, r * CELL : (r + 1) * CELL, c * CELL : (c + 1) * CELL]
        patch[:, _MASKS[shape]] = _COLOUR_RGB[colour][:, None]
    return img


def read_board(pixel_values: torch.Tensor) -> Board:
    """Decode one normalized image ``(3, H, W)`` back into its cells (inverse of ``render``)."""
    img = (pixel_values.detach().float().cpu().numpy() * PIXEL_STD) + PIXEL_MEAN
    board: Board = []
    for idx in range(TOKENS_PER_IMAGE):
        r, c = divmod(idx, GRID)
        patch = img[:, r * CELL : (r + 1) * CELL, c * CELL : (c + 1) * CELL]
        lit = patch.max(axis=0) > 0.5
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

    ``input_ids`` (L,) prompt only, image placeholders already expanded; ``pixel_values``
    (num_images, 3, IMAGE_SIZE, IMAGE_SIZE) normalized with mean/std 0.5; ``answer_ids`` (A,)
    the answer tokens without ``<eos>``; ``evidence`` the prompt positions the answer is read
    from (for analysis: a pruned cache that drops them cannot answer).
    """

    task: str
    input_ids: torch.Tensor
    pixel_values: torch.Tensor
    answer: str
    answer_ids: torch.Tensor
    evidence: torch.Tensor
    prompt: str = field(repr=False, default="")

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


def _other_object(rng: np.random.Generator, avoid: Sequence[Cell]) -> tuple[str, str]:
    while True:
        obj = (list(COLOURS)[rng.integers(len(COLOURS))], SHAPES[rng.integers(len(SHAPES))])
        if obj not in avoid:
            return obj


def _encode(words: Sequence[str]) -> list[int]:
    return [TOKEN_TO_ID[w] for w in words]


def make_sample(
    task: str,
    seed: int,
    *,
    num_images: int,
    num_facts: int | None = None,
    fill: float = 0.5,
) -> Sample:
    """Build one sample of ``task``, fully determined by ``seed`` and the keyword arguments.

    ``num_images`` in [2, 64]; ``num_facts`` text facts interleaved with the images (default:
    between 1 and 4, at least 1 for ``text_needle``); ``fill`` the chance a cell is non-empty.
    """
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not a VisualHaystack task; allowed: {TASKS}")
    if not 2 <= num_images <= MAX_IMAGES:
        raise ValueError(f"num_images={num_images} is out of range; allowed: 2..{MAX_IMAGES}")
    if not 0.0 < fill < 1.0:
        raise ValueError(f"fill={fill} is out of range; allowed: 0 < fill < 1")
    task_index = TASKS.index(task)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), task_index, num_images]))
    if num_facts is None:
        num_facts = int(rng.integers(1, 5))
    if not 0 <= num_facts <= len(KEYS):
        raise ValueError(f"num_facts={num_facts} is out of range; allowed: 0..{len(KEYS)}")
    if task == "text_needle" and num_facts < 1:
        raise ValueError("num_facts=0 is not allowed for task 'text_needle'; allowed: >= 1")

    names = [NAMES[i] for i in rng.permutation(len(NAMES))[:num_images]]
    boards = [_random_board(rng, fill) for _ in range(num_images)]
    keys = [KEYS[i] for i in rng.permutation(len(KEYS))[:num_facts]]
    values = [VALUES[i] for i in rng.integers(len(VALUES), size=num_facts)]
    # facts go after image slots; the comparison pair must stay adjacent
    fact_slots = sorted(rng.integers(0, num_images + 1, size=num_facts).tolist())

    target_image, target_cells, target_fact = 0, [0], -1
    if task == "image_needle":
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        shape = SHAPES[rng.integers(len(SHAPES))]
        obj = (colour, shape)
        for b in boards:
            for i, cell in enumerate(b):
                if cell == obj:
                    b[i] = _other_object(rng, [obj])
        target_image = int(rng.integers(num_images))
        target_cells = [int(rng.integers(TOKENS_PER_IMAGE))]
        boards[target_image][target_cells[0]] = obj
        question = ["which", "image", "has", "a", colour, shape, "?"]
        answer = [names[target_image]]
    elif task == "text_needle":
        target_fact = int(rng.integers(num_facts))
        question = ["what", "is", keys[target_fact], "?"]
        answer = [values[target_fact]]
    elif task == "cross_modal":
        shape = SHAPES[rng.integers(len(SHAPES))]
        target_image = int(rng.integers(num_images))
        b = boards[target_image]
        for i, cell in enumerate(b):
            if cell is not None and cell[1] == shape:
                b[i] = None
        target_cells = [int(rng.integers(TOKENS_PER_IMAGE))]
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        b[target_cells[0]] = (colour, shape)
        question = ["what", "colour", "is", "the", shape, "in", names[target_image], "?"]
        answer = [colour]
    else:  # comparison
        target_image = int(rng.integers(1, num_images))
        first = boards[target_image - 1]
        second = list(first)
        cell_idx = int(rng.integers(TOKENS_PER_IMAGE))
        second[cell_idx] = _other_object(rng, [first[cell_idx]])
        boards[target_image] = second
        target_cells = [cell_idx]
        fact_slots = [s if s != target_image else s + 1 for s in fact_slots]
        fact_slots.sort()
        question = ["what", "changed", "from", names[target_image - 1], "to"]
        question += [names[target_image], "?"]
        answer = list(second[cell_idx])

    words: list[str] = ["<bos>"]
    evidence: list[int] = []
    facts = iter(range(num_facts))
    pending = list(fact_slots)

    def emit_facts(slot: int) -> None:
        while pending and pending[0] == slot:
            pending.pop(0)
            f = next(facts)
            if f == target_fact:
                evidence.extend(range(len(words), len(words) + 3))
            words.extend([keys[f], "is", values[f], "."])

    for k in range(num_images):
        emit_facts(k)
        start = len(words) + 2
        if task in ("image_needle", "cross_modal", "comparison") and k == target_image:
            evidence.append(start - 1)  # the name token
            evidence.extend(start + c for c in target_cells)
        if task == "comparison" and k == target_image - 1:
            evidence.append(start - 1)
            evidence.extend(start + c for c in target_cells)
        words.extend(["image", names[k]] + ["<image>"] * TOKENS_PER_IMAGE)
    emit_facts(num_images)
    evidence.extend(range(len(words), len(words) + len(question)))
    words.extend(question)

    pixels = np.stack([render(b) for b in boards])
    pixel_values = torch.from_numpy((pixels - PIXEL_MEAN) / PIXEL_STD)
    return Sample(
        task=task,
        input_ids=torch.tensor(_encode(words), dtype=torch.long),
        pixel_values=pixel_values,
        answer=" ".join(answer),
        answer_ids=torch.tensor(_encode(answer), dtype=torch.long),
        evidence=torch.tensor(sorted(set(evidence)), dtype=torch.long),
        prompt=" ".join(words),
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
) -> list[Sample]:
    """``n`` samples cycling through ``tasks``; train and test draw from disjoint seed streams.

    ``num_images`` an int or an inclusive ``(low, high)`` range; default
    ``DEFAULT_NUM_IMAGES[split]``.
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
        samples.append(make_sample(tasks[i % len(tasks)], s, num_images=k))
    return samples


# --------------------------------------------------------------------------- batching, scoring


def collate(samples: Sequence[Sample], *, with_answers: bool = False) -> dict[str, torch.Tensor]:
    """Left-pad a batch.

    Returns ``input_ids`` / ``attention_mask`` (batch, L_max) with ``PAD_TOKEN_ID`` / 0 on the
    left, and ``pixel_values`` (total_images, 3, H, W) concatenated in batch order (LLaVA fills
    image tokens in row-major order). With ``with_answers`` every row is prompt + answer +
    ``<eos>`` and ``labels`` (batch, L_max) holds -100 except on answer and ``<eos>`` tokens,
    aligned with ``input_ids`` (shift by one to train next-token prediction).
    """
    if not samples:
        raise ValueError("collate() got an empty batch")
    rows, label_rows = [], []
    for s in samples:
        if with_answers:
            tail = torch.cat([s.answer_ids, torch.tensor([EOS_TOKEN_ID])])
            rows.append(torch.cat([s.input_ids, tail]))
            label_rows.append(torch.cat([torch.full_like(s.input_ids, -100), tail]))
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


def solve(sample: Sample) -> str:
    """Answer a sample from its content alone (prompt tokens + decoded pixels).

    The oracle behind the "each task is answerable" tests; it reads boards from pixels, never
    from generator state.
    """
    words = [VOCAB[i] for i in sample.input_ids.tolist()]
    names = [words[i + 1] for i, w in enumerate(words) if w == "image" and i + 1 < len(words)]
    names = [n for n in names if n in NAMES]
    boards = dict(zip(names, (read_board(p) for p in sample.pixel_values), strict=True))
    q_start = max(i for i, w in enumerate(words) if w in ("which", "what"))
    q = words[q_start:-1]
    if q[0] == "which":
        obj = (q[4], q[5])
        hits = [n for n, b in boards.items() if obj in b]
        return hits[0] if len(hits) == 1 else ""
    if q[1] == "colour":
        shape, name = q[4], q[6]
        hits = [c[0] for c in boards[name] if c is not None and c[1] == shape]
        return hits[0] if len(hits) == 1 else ""
    if q[1] == "changed":
        a, b = boards[q[3]], boards[q[5]]
        diff = [j for j in range(TOKENS_PER_IMAGE) if a[j] != b[j]]
        return " ".join(b[diff[0]]) if len(diff) == 1 and b[diff[0]] is not None else ""
    key = q[2]
    facts = [words[i + 2] for i, w in enumerate(words[:q_start]) if w == key]
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


def load_builtin_model(path: str | Path = BUILTIN_MODEL_PATH):
    """The shipped tiny LLaVA trained on VisualHaystack (offline, eval mode, fp32)."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(str(path), local_files_only=True)
    return model.eval()
