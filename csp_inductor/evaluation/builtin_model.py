"""The built-in model: the shipped tiny LLaVA trained on VisualHaystack, its word-level
tokenizer and its processor; saving a trained one, and its full-cache accuracy."""

from __future__ import annotations

from pathlib import Path

import torch

from csp_inductor.evaluation.batching import collate, score
from csp_inductor.evaluation.boards import (
    BOS_TOKEN_ID,
    CELL,
    EOS_TOKEN_ID,
    IMAGE_SIZE,
    NUM_CHANNELS,
    PAD_TOKEN_ID,
    PIXEL_MEAN,
    PIXEL_STD,
    SPECIAL_TOKENS,
    TOKEN_TO_ID,
)

BUILTIN_MODEL_PATH = Path(__file__).parents[1] / "assets" / "tiny_llava"


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


@torch.no_grad()
def evaluate(model, samples, *, batch_size: int = 8, max_new_tokens: int = 3):
    """Greedy full-cache accuracy per task: ``{task: accuracy}`` plus ``"all"``."""
    model.eval()
    hits: dict[str, list[bool]] = {}
    ordered = sorted(samples, key=lambda s: len(s.input_ids))
    for i in range(0, len(ordered), batch_size):
        chunk = ordered[i : i + batch_size]
        batch = collate(chunk)
        out = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=PAD_TOKEN_ID,
            eos_token_id=EOS_TOKEN_ID,
        )
        new = out[:, batch["input_ids"].shape[1] :]
        for s, ids in zip(chunk, new, strict=True):
            hits.setdefault(s.task, []).append(score(ids, s))
    acc = {t: sum(v) / len(v) for t, v in sorted(hits.items())}
    acc["all"] = sum(sum(v) for v in hits.values()) / max(1, len(samples))
    return acc


def save_pretrained(model, out: Path) -> None:
    """Write model (safetensors), tokenizer, processor and generation config to ``out``."""
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
        pad_token_id=PAD_TOKEN_ID,
        do_sample=False,
        max_new_tokens=3,
    )
    model.save_pretrained(out)
    build_processor().save_pretrained(out)  # also writes the tokenizer files
