"""The task's documents: row ``index`` of ``test.jsonl`` is VisualHaystack's held-out prompt
``index`` (``make_split("test", ROWS, seed=SEED)``), rendered as a chat of text and images."""

from functools import cache
from itertools import groupby

from PIL import Image

from csp_inductor.evaluation import haystack as hs

ROWS, SEED = 16, 7


@cache
def _samples() -> list[hs.Sample]:
    return hs.make_split("test", ROWS, seed=SEED)


def _sample(doc: dict) -> hs.Sample:
    return _samples()[doc["index"]]


def doc_to_visual(doc: dict) -> list[Image.Image]:
    pixels = _sample(doc).pixel_values * hs.PIXEL_STD + hs.PIXEL_MEAN
    return [Image.fromarray((p * 255).round().byte().permute(1, 2, 0).numpy()) for p in pixels]


def doc_to_text(doc: dict) -> str:
    return _sample(doc).prompt


def doc_to_target(doc: dict) -> str:
    return _sample(doc).answer


def doc_to_messages(doc: dict) -> list[dict]:
    """One user message: the prompt's words, each image's run of placeholders as the image."""
    images, content = iter(doc_to_visual(doc)), []
    for placeholders, run in groupby(doc_to_text(doc).split(" "), key=lambda w: w == "<image>"):
        run = list(run)
        if placeholders:  # (adjacent images make one run)
            count = len(run) // hs.TOKENS_PER_IMAGE
            content += [{"type": "image", "url": next(images)} for _ in range(count)]
        else:
            content.append({"type": "text", "text": " ".join(run)})
    return [{"role": "user", "content": content}]


def process_results(doc: dict, results: list[str]) -> dict:
    return {"exact_match": float(hs.score(results[0], _sample(doc)))}
