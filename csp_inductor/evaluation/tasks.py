"""The questions of VisualHaystack's four tasks (see :mod:`csp_inductor.evaluation.haystack`):
random boards, and each task's questions planned on a sample's boards and facts so that every
question has exactly one answer."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from csp_inductor.evaluation.boards import COLOURS, SHAPES, TOKENS_PER_IMAGE, VALUES, Board, Cell


def random_board(rng: np.random.Generator, fill: float) -> Board:
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


# (question words, answer words, [(image index, cell index)] or [fact index])
Question = tuple[list[str], list[str], list[tuple[int, int]], list[int]]


def plan_questions(
    task: str,
    rng: np.random.Generator,
    names: list[str],
    boards: list[Board],
    keys: list[str],
    values: list[str],
    num_questions: int,
) -> list[Question]:
    """Edit ``boards`` in place so each question has exactly one answer; return the questions."""
    num_images = len(boards)
    questions: list[Question] = []
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
