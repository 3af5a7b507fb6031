"""VisualHaystack's pictures and words: board geometry, colours and shapes, the frame codes that
name an image in its pixels, the word-level vocabulary; drawing a board and reading one back.

See :mod:`csp_inductor.evaluation.haystack` for how samples are built from them.
"""

from __future__ import annotations

import numpy as np
import torch

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
