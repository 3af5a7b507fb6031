"""MileBench adapter: read the released data, prompt any local HF VLM, score as MileBench does.

MileBench (Song et al., 2024) ships one directory per dataset::

    <data_dir>/<name>/<name>.json
        {"meta_data": {"task_instruction": [...], "question_type": ...},
         "data": [{"sample_id", "task_instruction_id", "image_quantity_level", "response",
                   "task_instance": {"context", "images_path", "choice_list"?}}, ...]}
    <data_dir>/<name>/images/<file>   the files named in ``images_path``

``context`` marks where image ``k`` (1-based) goes with ``{image#k}`` (``{table#k}`` for tables).
The prompt is MileBench's: task instruction, newline, context, and for multiple choice
``"\\nChoice list: \\nA. ...\\nB. ...\\nYour answer is: "`` (GPR1200 without letters). We keep the
images at their placeholders (interleaved) and render them through the processor's chat template.

Scoring (:mod:`csp_inductor.evaluation.milebench_metrics`) follows MileBench's ``evaluate.py``,
with the differences documented there; prompts are not truncated to a context budget.

Nothing here downloads: models load with ``local_files_only=True`` from a local directory.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from csp_inductor.evaluation.milebench_metrics import (
    EMPTY_ANSWER_CHOICE,
    NEEDLE_SUBSTRING_DATASETS,
    NEEDLE_TOKEN_DATASETS,
    OPEN_ENDED_DATASETS,
    match_choice,
    metric_for,
    multiple_choice_correct,
    normalize_answer,
    rouge_l,
    score,
)

__all__ = [
    "EMPTY_ANSWER_CHOICE",
    "NEEDLE_SUBSTRING_DATASETS",
    "NEEDLE_TOKEN_DATASETS",
    "OPEN_ENDED_DATASETS",
    "UNLETTERED_CHOICE_DATASETS",
    "MileSample",
    "build_inputs",
    "build_messages",
    "evaluate",
    "load_dataset",
    "load_images",
    "load_model",
    "match_choice",
    "metric_for",
    "multiple_choice_correct",
    "normalize_answer",
    "prompt_segments",
    "prompt_text",
    "rouge_l",
    "run",
    "score",
]

# GPR1200 has more options than letters, so MileBench lists its choices without "A. " prefixes.
UNLETTERED_CHOICE_DATASETS = frozenset({"GPR1200"})

_PLACEHOLDER = re.compile(r"\{(?:image|table)#(\d+)\}")


@dataclass(frozen=True)
class MileSample:
    """One MileBench sample; images are paths, loaded on demand by :func:`load_images`.

    ``choices`` is None for open-ended samples. ``question_type`` is the dataset's
    ``meta_data.question_type`` ("multi-choice", "open-ended", or "" when the file leaves it empty).
    """

    dataset: str
    sample_id: int | str
    instruction: str
    context: str  # with {image#k} / {table#k} placeholders, 1-based into image_paths
    image_paths: tuple[Path, ...]
    response: str
    choices: tuple[str, ...] | None = None
    question_type: str = ""
    image_quantity_level: str | None = None


# --------------------------------------------------------------------------- loading


def load_dataset(data_dir: str | Path, name: str, *, limit: int | None = None) -> list[MileSample]:
    """Read ``<data_dir>/<name>/<name>.json`` and check that every image exists.

    ``limit`` keeps the first ``limit`` samples (None = all). Raises FileNotFoundError naming the
    missing path and what was expected there, ValueError for a malformed file.
    """
    data_dir = Path(data_dir)
    layout = "<data_dir>/<name>/<name>.json and <data_dir>/<name>/images/ (MileBench's layout)"
    if not data_dir.is_dir():
        raise FileNotFoundError(
            f"MileBench data directory {data_dir} does not exist; expected a directory "
            f"with {layout}"
        )
    ds_dir = data_dir / name
    if not ds_dir.is_dir():
        found = sorted(p.name for p in data_dir.iterdir() if p.is_dir())
        raise FileNotFoundError(
            f"MileBench dataset directory {ds_dir} does not exist; expected {layout}. "
            f"Datasets found in {data_dir}: {found or 'none'}"
        )
    ann_path = ds_dir / f"{name}.json"
    if not ann_path.is_file():
        raise FileNotFoundError(
            f"MileBench annotation file {ann_path} does not exist; expected {name}.json with "
            f"'meta_data' and 'data' inside {ds_dir}"
        )
    try:
        payload = json.loads(ann_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{ann_path} is not valid JSON: {err}") from err
    if not isinstance(payload, dict) or not isinstance(payload.get("data"), list):
        raise ValueError(f"{ann_path}: expected a JSON object with a 'data' list of samples")
    meta = payload.get("meta_data", payload.get("metadata"))
    if not isinstance(meta, dict) or "task_instruction" not in meta:
        raise ValueError(f"{ann_path}: expected 'meta_data' with a 'task_instruction' field")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be None or >= 0, got {limit}")
    rows = payload["data"] if limit is None else payload["data"][:limit]
    question_type = str(meta.get("question_type") or "")
    img_dir = ds_dir / "images"
    return [_parse_sample(name, row, meta, question_type, img_dir, ann_path) for row in rows]


def _parse_sample(name, row, meta, question_type, img_dir: Path, ann_path: Path) -> MileSample:
    where = f"{ann_path} sample {row.get('sample_id', '?')!r}" if isinstance(row, dict) else ""
    try:
        inst = row["task_instance"]
        sample_id, context, files = row["sample_id"], inst["context"], inst["images_path"]
        response = row["response"]
    except (KeyError, TypeError) as err:
        raise ValueError(
            f"{where or ann_path}: missing field {err}; expected sample_id, response and "
            "task_instance with context and images_path"
        ) from None
    instructions = meta["task_instruction"]
    if isinstance(instructions, str):
        instruction = instructions
    else:
        idx = row.get("task_instruction_id", 0)
        if not isinstance(idx, int) or not 0 <= idx < len(instructions):
            raise ValueError(
                f"{where}: task_instruction_id={idx!r} out of range for "
                f"{len(instructions)} task instructions"
            )
        instruction = instructions[idx]
    image_paths = tuple(img_dir / f for f in files)
    for path in image_paths:
        if not path.is_file():
            raise FileNotFoundError(
                f"{where}: image {path} does not exist; expected the files of "
                f"task_instance.images_path under {img_dir}"
            )
    for k in _PLACEHOLDER.findall(context):
        if not 1 <= int(k) <= len(image_paths):
            raise ValueError(
                f"{where}: placeholder #{k} in context but the sample has {len(image_paths)} images"
            )
    choices = inst.get("choice_list")
    return MileSample(
        dataset=name,
        sample_id=sample_id,
        instruction=str(instruction),
        context=str(context),
        image_paths=image_paths,
        response=str(response),
        choices=None if choices is None else tuple(str(c) for c in choices),
        question_type=question_type,
        image_quantity_level=row.get("image_quantity_level"),
    )


def load_images(sample: MileSample) -> list[Any]:
    """The sample's images as RGB PIL images, in ``images_path`` order."""
    from PIL import Image

    out = []
    for path in sample.image_paths:
        with Image.open(path) as img:
            out.append(img.convert("RGB"))
    return out


# --------------------------------------------------------------------------- prompts


def prompt_text(sample: MileSample) -> str:
    """MileBench's prompt text, placeholders still in: instruction, context, choice list."""
    text = sample.instruction + "\n" + sample.context
    if sample.choices is not None:
        lettered = sample.dataset not in UNLETTERED_CHOICE_DATASETS
        lines = [(f"{chr(65 + i)}. " if lettered else "") + c for i, c in enumerate(sample.choices)]
        text += "\nChoice list: \n" + "\n".join(lines) + "\nYour answer is: "
    return text


def prompt_segments(sample: MileSample) -> list[str | int]:
    """The prompt as interleaved pieces: ``str`` text, ``int`` 0-based index into image_paths.

    Each ``{image#k}``/``{table#k}`` becomes ``k - 1`` at its place. Images no placeholder
    mentions go first, in order (as MileBench's combined-image prompts put images first).
    """
    text = prompt_text(sample)
    parts: list[str | int] = []
    pos = 0
    for m in _PLACEHOLDER.finditer(text):
        if m.start() > pos:
            parts.append(text[pos : m.start()])
        parts.append(int(m.group(1)) - 1)
        pos = m.end()
    if pos < len(text):
        parts.append(text[pos:])
    used = {p for p in parts if isinstance(p, int)}
    return [i for i in range(len(sample.image_paths)) if i not in used] + parts


def build_messages(sample: MileSample) -> tuple[list[dict], list[Any]]:
    """A one-turn chat (``[{"role": "user", "content": [...]}]``) and its images in the order the
    ``{"type": "image"}`` entries appear (an image used twice appears twice)."""
    images = load_images(sample)
    content: list[dict] = []
    ordered: list[Any] = []
    for part in prompt_segments(sample):
        if isinstance(part, int):
            content.append({"type": "image"})
            ordered.append(images[part])
        else:
            content.append({"type": "text", "text": part})
    return [{"role": "user", "content": content}], ordered


def build_inputs(processor: Any, sample: MileSample) -> Any:
    """Tokenized inputs (a ``BatchFeature`` of batch 1) for ``model.generate``.

    With a chat template the text is rendered by ``processor.apply_chat_template`` (generation
    prompt added); without one, each image becomes ``processor.image_token`` in the plain text.
    """
    messages, images = build_messages(sample)
    if getattr(processor, "chat_template", None):
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    else:
        token = getattr(processor, "image_token", None)
        if token is None:
            raise TypeError(
                f"{type(processor).__name__} has neither a chat_template nor an image_token; "
                "cannot place the images of a MileBench prompt"
            )
        text = "".join(token if c["type"] == "image" else c["text"] for c in messages[0]["content"])
    # one list of images per text: the form every processor accepts (Idefics3/Gemma3 require it)
    return processor(text=[text], images=[images] if images else None, return_tensors="pt")


# --------------------------------------------------------------------------- models


def load_model(model_dir: str | Path, *, dtype: Any = None, device: str = "cpu"):
    """``(model, processor)`` from a local HF checkpoint directory; never downloads."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        what = "has no config.json" if model_dir.is_dir() else "does not exist"
        raise FileNotFoundError(
            f"model directory {model_dir} {what}; expected a local Hugging Face checkpoint "
            "(config.json, weights, processor files). Models are never downloaded here."
        )
    processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(
        model_dir, local_files_only=True, dtype=dtype
    )
    return model.to(device).eval(), processor


def run(
    model: Any,
    processor: Any,
    samples: Sequence[MileSample],
    *,
    max_new_tokens: int = 512,
    generate_kwargs: dict | None = None,
) -> list[str]:
    """Greedy ``model.generate`` per sample; returns the decoded new text of each, stripped.

    ``max_new_tokens`` defaults to MileBench's configured 512. ``generate_kwargs`` are passed
    through and may override the greedy default (``do_sample=False``).
    """
    import torch

    if model is None or processor is None:
        raise ValueError("run() needs a model and its processor; got None (see load_model)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    kwargs = {"max_new_tokens": max_new_tokens, "do_sample": False, **(generate_kwargs or {})}
    outputs = []
    for sample in samples:
        inputs = build_inputs(processor, sample).to(model.device)
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        with torch.inference_mode():
            out = model.generate(**inputs, **kwargs)
        new = out[:, inputs["input_ids"].shape[1] :]
        outputs.append(processor.batch_decode(new, skip_special_tokens=True)[0].strip())
    return outputs


def evaluate(
    model: Any,
    processor: Any,
    data_dir: str | Path,
    name: str,
    *,
    max_new_tokens: int = 512,
    generate_kwargs: dict | None = None,
    limit: int | None = None,
) -> dict[str, Any]:
    """Load, generate and score one dataset; :func:`score`'s dict plus ``"predictions"``."""
    samples = load_dataset(data_dir, name, limit=limit)
    predictions = run(
        model, processor, samples, max_new_tokens=max_new_tokens, generate_kwargs=generate_kwargs
    )
    return {**score(name, predictions, samples), "predictions": predictions}
