"""``python -m csp_inductor check --model PATH``: does the backend serve this checkpoint?

For a local checkpoint of any VLM or LLM (nothing is downloaded), in its own dtype:

1. what the detection of the model's layout finds: the decoder, how a prompt marks its visual
   tokens, and what the backend does with each decoder layer (pruned, kept whole, shared), or
   why it refuses it;
2. whether ``Full()`` reproduces the unmodified model's greedy tokens on a short prompt made
   by the model's own processor (with a generated image for a VLM), and how far the logits
   moved;
3. the KV bytes ``CSP(0.2)`` holds after the same generation, against ``Full()``'s.

Exit status: 0 served and exact; 1 refused, not exact, or the backend failed; 2 the checkpoint,
its config, its processor or tokenizer, or the unmodified model itself failed, or the
arguments are wrong.
"""

from __future__ import annotations

import argparse
import inspect
import time
from itertools import groupby
from pathlib import Path

import torch
from torch import Tensor, nn

SERVED, REFUSED, UNUSABLE = 0, 1, 2
W = 17  # the width of the report's first column
QUESTION = "Describe the image in one sentence."
# a text-only model's prompt: long enough that CSP(0.2) prunes it
PASSAGE = (
    "The picture is a square of 256 by 256 pixels. Its red channel rises from left to right, "
    "its green channel from top to bottom, and its blue channel is brightest in the middle "
    "and fades towards the corners, so each corner has a colour of its own and no two rows "
    "are alike. Describe the picture in one sentence."
)
DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16,
          "float16": torch.float16}  # fmt: skip


class Unusable(Exception):
    """The checkpoint or its processor could not be loaded or prompted (exit status 2)."""


def load(path: str, dtype, device: str, remote: bool) -> nn.Module:
    """The checkpoint as an image-text-to-text model if transformers has one for its
    ``model_type`` (or its own code declares one, with ``remote``), else as a causal LM; eval
    mode, on ``device``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto import modeling_auto
    from transformers.utils import logging

    if not Path(path).is_dir():
        raise Unusable(f"no checkpoint folder at {path}")
    logging.disable_progress_bar()
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=remote)
    except Exception as e:  # transformers raises OSError, ValueError or KeyError by cause
        hint = "" if remote else " (a model with its own code needs --trust-remote-code)"
        raise Unusable(f"no transformers config could be read at {path}: {e}{hint}") from e
    own = (getattr(config, "auto_map", None) or {}) if remote else {}  # its own model classes
    if (
        config.model_type in modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
        or "AutoModelForImageTextToText" in own
    ):
        auto = AutoModelForImageTextToText
    elif (
        config.model_type in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        or "AutoModelForCausalLM" in own
    ):
        auto = AutoModelForCausalLM
    else:
        raise Unusable(
            f"model_type={config.model_type!r} is neither an image-text-to-text model nor a "
            "causal LM in this transformers, so it has no generate() for the backend to serve"
        )
    try:
        model, info = auto.from_pretrained(
            path, local_files_only=True, dtype=dtype, output_loading_info=True,
            trust_remote_code=remote,
        )  # fmt: skip
        model = model.to(device).eval()
    except Exception as e:  # a truncated or mismatched weights file, out of memory, ...
        raise Unusable(
            f"the checkpoint at {path} could not be loaded: {type(e).__name__}: {e}"
        ) from e
    missing = info.get("missing_keys") or []
    if missing:
        shown = ", ".join(sorted(missing)[:3]) + (", ..." if len(missing) > 3 else "")
        print(f"{'note':<{W}}{len(missing)} weights missing from the checkpoint: {shown}")
    return model


def describe(layout) -> list[str]:
    """Report lines: the decoder, the visual tokens, and each run of alike decoder layers."""
    visual = []
    if layout.token_ids:
        visual.append(f"placeholder ids {', '.join(map(str, layout.token_ids))}")
    if layout.token_types:
        visual.append("mm_token_type_ids")
    lines = [
        f"{type(layout.decoder).__name__}, {len(layout.layer_types)} layer"
        f"{'s' if len(layout.layer_types) > 1 else ''}; visual tokens: "
        + (" and ".join(visual) or "none (a text-only model: CSP ranks text alone)")
    ]

    def what(i: int) -> str:
        kind = layout.layer_types[i]
        if kind == "attention":
            if layout.windows[i]:
                return f"pruned (sliding window {layout.windows[i]})"
            if layout.chunks[i]:
                return f"pruned (chunked attention, chunk {layout.chunks[i]})"
            return "pruned (full attention)"
        if kind == "recurrent":
            return "kept whole (a recurrent state, not K/V)"
        if kind == "shared":
            return f"nothing stored (reads layer {layout.kv_source[i]}'s pruned K/V)"
        return "nothing stored (no attention)"

    for text, run in groupby(range(len(layout.layer_types)), key=what):
        run = list(run)
        span = f"{run[0]}" if len(run) == 1 else f"{run[0]}-{run[-1]}"
        lines.append(f"layer{'s' if len(run) > 1 else ''} {span}: {text}")
    return lines


def probe_image():
    """A 256x256 RGB image with structure in every channel, the same every run."""
    from PIL import Image

    ramp = Image.linear_gradient("L")
    return Image.merge("RGB", (ramp, ramp.rotate(90), Image.radial_gradient("L")))


def prompt(path: str, model: nn.Module, layout, remote: bool) -> tuple[dict, str]:
    """``generate`` inputs for one short question (with :func:`probe_image` for a model with
    visual tokens), made by the checkpoint's own processor or tokenizer, and what was made."""
    from transformers import AutoProcessor, AutoTokenizer

    failed = None  # why the processor could not be loaded, if only the tokenizer could
    try:
        processor = AutoProcessor.from_pretrained(
            path, local_files_only=True, trust_remote_code=remote
        )
    except Exception as e:  # e.g. an image or video processor that needs torchvision
        try:
            processor = AutoTokenizer.from_pretrained(
                path, local_files_only=True, trust_remote_code=remote
            )
        except Exception:
            raise Unusable(f"no processor or tokenizer could be loaded from {path}: {e}") from e
        failed = f"{type(e).__name__}: {e}"
        failed = failed if len(failed) <= 200 else failed[:200] + "..."
    image_token = getattr(processor, "image_token", None)
    multimodal = hasattr(processor, "image_processor")  # (a bare tokenizer takes text only)
    with_image = layout.multimodal and image_token is not None and multimodal
    # multimodal chat templates read a list of typed parts, text-only ones a string
    content = PASSAGE
    if multimodal:
        content = [{"type": "text", "text": QUESTION if with_image else PASSAGE}]
    if with_image:
        content.insert(0, {"type": "image"})
    try:
        if getattr(processor, "chat_template", None):
            messages = [{"role": "user", "content": content}]
            text = processor.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
        else:
            text = f"{image_token}\n{QUESTION}" if with_image else PASSAGE
        if with_image:
            inputs = processor(text=[text], images=[probe_image()], return_tensors="pt")
        else:
            inputs = processor(text=[text], return_tensors="pt")
    except Exception as e:
        raise Unusable(f"the processor of {path} failed on the test prompt: {e}") from e
    ids, vocab = inputs["input_ids"], model.get_input_embeddings().num_embeddings
    if ids.numel() == 0 or int(ids.max()) >= vocab:
        raise Unusable(
            f"the processor of {path} made a prompt the model cannot read ({ids.numel()} tokens, "
            f"ids up to {int(ids.max()) if ids.numel() else None} for {vocab} embeddings): is "
            "the model's tokenizer in the folder?"
        )
    # what the model's forward takes (a generic tokenizer's token_type_ids would be refused)
    takes = inspect.signature(model.forward).parameters
    inputs = {
        k: v.to(model.device, model.dtype) if v.is_floating_point() else v.to(model.device)
        for k, v in inputs.items()
        if isinstance(v, torch.Tensor) and k in takes
    }
    made = "the model's processor" + (", a generated 256x256 image" if with_image else "")
    if failed is not None:
        made = f"the model's tokenizer, text only: its processor could not be loaded ({failed})"
    elif layout.multimodal and not with_image:
        made += " (text only: it takes no images)"
    return inputs, made


def greedy(model, inputs: dict, new_tokens: int, **options) -> tuple[Tensor, Tensor]:
    """Greedy ``generate`` (``options``: more of its arguments): the new tokens (batch,
    new_tokens) and their logits (batch, new_tokens, vocab)."""
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=new_tokens, do_sample=False, output_logits=True,
            return_dict_in_generate=True, **options,
        )  # fmt: skip
    return out.sequences[:, inputs["input_ids"].shape[1] :], torch.stack(out.logits, dim=1)


def run(args) -> int:
    from . import CSP, Full, compile, restore
    from .model_layout import detect, modality

    started = time.perf_counter()
    model = load(args.model, DTYPES[args.dtype], args.device, args.trust_remote_code)
    print(
        f"{'checkpoint':<{W}}{args.model} (model_type={model.config.model_type!r}, "
        f"{type(model).__name__}, {str(model.dtype).removeprefix('torch.')}, {args.device})"
    )
    try:
        layout = detect(model, "csp_inductor")
    except TypeError as e:
        print(f"{'refused':<{W}}{e}")
        return REFUSED
    head, *layers = describe(layout)
    print(f"{'decoder':<{W}}{head}")
    for line in layers:
        print(f"{'':<{W}}{line}")

    inputs, made = prompt(args.model, model, layout, args.trust_remote_code)
    ids = inputs["input_ids"]
    is_image = modality(layout, ids, inputs.get("mm_token_type_ids"))
    visual = 0 if is_image is None else int(is_image.sum())
    print(f"{'prompt':<{W}}{ids.shape[1]} tokens ({visual} visual), from {made}")

    greedily = dict(min_new_tokens=args.new_tokens, num_beams=1)
    try:
        want = greedy(model, inputs, args.new_tokens, **greedily)
    except Exception as e:
        raise Unusable(f"the unmodified model failed on the test prompt: {e}") from e
    kept, held = {}, {}
    runs = [("Full()", Full(), False), ("CSP(0.2)", CSP(budget=0.2), False)]
    if args.compile:
        runs.insert(1, ("Full() compiled", Full(), True))
    exact = True
    for name, policy, compiled in runs:
        try:
            compile(model, policy, compile=compiled)
        except (TypeError, ValueError) as e:
            print(f"{'refused':<{W}}{e}")
            return REFUSED
        try:
            got = greedy(model, inputs, args.new_tokens, **greedily)
            held[name] = model.csp_backend.cache.nbytes()
            kept[name] = model.csp_backend.cache.kept_prompt[0]
            per_token = model.csp_backend.cache.kv_bytes_per_token()
        except Exception as e:  # the backend failed on this model: that is the answer
            print(f"{name:<{W}}FAILED: {type(e).__name__}: {e}")
            return REFUSED
        finally:
            restore(model)
        if not isinstance(policy, CSP):
            exact &= _compare(name, got, want)
    _print_bytes(kept, held, per_token, args.new_tokens)
    status = SERVED if exact else REFUSED
    verdict = "served" if exact else "NOT served: Full() differs from the unmodified model"
    if exact and layout.multimodal and not visual:
        verdict += " for text (the prompt had no visual tokens: they are unchecked)"
    print(f"{'result':<{W}}{verdict} ({time.perf_counter() - started:.0f} s, exit {status})")
    return status


def _compare(name: str, got, want) -> bool:
    """Print how the greedy tokens (and logits) of a run match the unmodified model's ``want``;
    whether the tokens are equal."""
    tokens, want_tokens = got[0][0].tolist(), want[0][0].tolist()
    same = sum(a == b for a, b in zip(tokens, want_tokens, strict=False))
    moved = ""
    if got[1].shape == want[1].shape:
        difference = (got[1].float() - want[1].float()).abs().max().item()
        moved = f" (max |logit difference| {difference:.2g})"
    print(
        f"{name:<{W}}{'exact' if tokens == want_tokens else 'NOT EXACT'}: {same} of "
        f"{len(want_tokens)} greedy tokens equal the unmodified model's{moved}"
    )
    return tokens == want_tokens


def _print_bytes(kept: dict, held: dict, per_token: int, new_tokens: int) -> None:
    """The KV bytes of CSP(0.2) against Full(): the prompt's, and the caches held."""
    prompt_bytes = {name: kept[name] * per_token for name in ("Full()", "CSP(0.2)")}
    print(
        f"{'KV bytes':<{W}}the prompt's: CSP(0.2) keeps {kept['CSP(0.2)']} of {kept['Full()']} "
        f"tokens, {_size(prompt_bytes['CSP(0.2)'])} vs {_size(prompt_bytes['Full()'])} "
        f"({prompt_bytes['CSP(0.2)'] / prompt_bytes['Full()']:.1%})"
    )
    print(
        f"{'':<{W}}held, with room for {new_tokens} new tokens: "
        f"{_size(held['CSP(0.2)'])} vs {_size(held['Full()'])} "
        f"({held['CSP(0.2)'] / held['Full()']:.1%})"
    )


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**20:.3g} MiB" if nbytes >= 2**20 else f"{nbytes / 2**10:.3g} KiB"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m csp_inductor check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--model", required=True, help="a local checkpoint folder (nothing downloaded)")
    p.add_argument("--dtype", choices=list(DTYPES), default="auto",
                   help="weights' dtype (auto: the checkpoint's)")  # fmt: skip
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--new-tokens", type=int, default=8, help="greedy tokens compared")
    p.add_argument("--compile", action="store_true", help="check the compiled decoder too")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the checkpoint's own modelling code")  # fmt: skip
    args = p.parse_args(argv)
    if args.new_tokens < 1:
        p.error(f"--new-tokens must be >= 1, got {args.new_tokens}")
    try:
        return run(args)
    except Unusable as e:
        print(f"{'unusable':<{W}}{e}")
        return UNUSABLE
