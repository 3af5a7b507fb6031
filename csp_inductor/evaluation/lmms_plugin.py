"""An lmms-eval model: any transformers VLM ``compile`` supports, pruned by a csp_inductor policy.

Registered through lmms-eval's ``lmms_eval.models`` entry points (``pip install -e .[lmms]``),
so lmms-eval runs it without a fork::

    lmms-eval --model csp_inductor \\
        --model_args pretrained=PATH,policy=csp,budget=0.2 --batch_size 8 \\
        --tasks visual_haystack_csp --include_path csp_inductor/evaluation/lmms_tasks

``policy`` is a policy's short name (``full``, ``csp``, ``snapkv``, …) and every other argument
that is not the model's is that policy's option (``budget``, ``window_ratio``, ``n``, …).
Prompts are batched (left-padded); the KV bytes the pruned caches held, and what full caches of
the same prompts would hold, are logged at the end of each ``generate_until`` and kept in
:attr:`CSPInductor.kv_bytes` / :attr:`CSPInductor.full_kv_bytes`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from lmms_eval.protocol import ChatMessages
from loguru import logger

import csp_inductor

from ..policies import POLICIES, make_policy
from . import haystack as hs

MODEL_ID = "csp_inductor"
BUILTIN = "builtin"  # pretrained=builtin: the shipped tiny LLaVA


def manifests() -> list[ModelManifest]:
    """The entry point lmms-eval reads (``lmms_eval.models`` group)."""
    return [ModelManifest(MODEL_ID, chat_class_path=f"{__name__}.CSPInductor")]


class CSPInductor(lmms):
    """lmms-eval chat model: greedy ``generate`` of a VLM under :func:`csp_inductor.compile`.

    Args:
        pretrained: a model directory or hub id (``AutoModelForImageTextToText``), or
            ``builtin`` for the shipped tiny LLaVA.
        policy: the policy's short name; its options come as further keyword arguments.
        compile: torch.compile the decoder (off by default: evaluation prompts vary in length).
        batch_size: prompts per ``generate`` call, left-padded.
        device: where the model runs.
        dtype: the weights' dtype (``auto``: as stored).
    """

    is_simple = False

    def __init__(
        self,
        pretrained: str = BUILTIN,
        policy: str = "csp",
        compile: bool = False,
        batch_size: int | str | None = 1,
        device: str | None = "cpu",
        dtype: str = "auto",
        **options,
    ) -> None:
        super().__init__()
        options.pop("max_batch_size", None)  # (lmms-eval passes it to every model)
        if policy not in POLICIES:
            raise ValueError(f"policy={policy!r} is not a policy; known: {sorted(POLICIES)}")
        self.policy = make_policy(policy, **options)
        self.batch_size = 1 if batch_size is None else int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got batch_size={batch_size!r}")
        from transformers import AutoModelForImageTextToText, AutoProcessor

        path = hs.BUILTIN_MODEL_PATH if pretrained == BUILTIN else pretrained
        if Path(path) == hs.BUILTIN_MODEL_PATH:
            self.model = hs.load_builtin_model(path)
        else:
            self.model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=dtype)
        self.model = self.model.to(device or "cpu").eval()
        self.processor = AutoProcessor.from_pretrained(str(path))
        self.processor.tokenizer.padding_side = "left"
        csp_inductor.compile(self.model, self.policy, compile=bool(compile))
        self.kv_bytes = 0  # what the pruned caches held, summed over batches
        self.full_kv_bytes = 0  # what full caches of the same prompts would have held

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError(
            "the csp_inductor lmms-eval model answers generation tasks (generate_until); "
            "loglikelihood tasks score a continuation without a pruned decode"
        )

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError(
            "the csp_inductor lmms-eval model answers single-round generation tasks; for "
            "conversations on one pruned cache see python -m csp_inductor chat"
        )

    def _prompt(self, messages: list[dict]) -> tuple[str, list]:
        """A chat's text (the processor's chat template, or its parts joined, each image as
        the processor's image token) and its images, in order."""
        chat = ChatMessages(messages=messages)
        images, videos, _ = chat.extract_media()
        if videos:
            raise ValueError("the csp_inductor lmms-eval model takes images, not videos")
        if getattr(self.processor, "chat_template", None):
            text = self.processor.apply_chat_template(
                chat.to_hf_messages(), tokenize=False, add_generation_prompt=True
            )
            return text, images
        token = self.processor.image_token
        parts = [
            content.text if content.type == "text" else token
            for message in chat.messages
            for content in message.content
        ]
        return " ".join(parts), images

    @torch.no_grad()
    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        results: list[GenerationResult | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):  # one generation config per batch
            groups.setdefault(repr(sorted(request.args[2].items())), []).append(i)
        backend = self.model.csp_backend
        for order in groups.values():
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                texts, images = [], []
                for i in chunk:
                    _, to_messages, _, doc_id, task, split = requests[i].args
                    doc = self.task_dict[task][split][doc_id]
                    text, doc_images = self._prompt(to_messages(doc))
                    texts.append(text)
                    images += doc_images
                # (a chat template writes the special tokens; so do the built-in prompts)
                inputs = self.processor(
                    text=texts, images=images or None, padding=True, return_tensors="pt",
                    add_special_tokens=False,
                ).to(self.model.device)  # fmt: skip
                kwargs = requests[chunk[0]].args[2]
                out = self.model.generate(
                    **inputs, do_sample=False, max_new_tokens=int(kwargs.get("max_new_tokens", 64)),
                    pad_token_id=self.processor.tokenizer.pad_token_id,
                )  # fmt: skip
                new = out[:, inputs["input_ids"].shape[1] :]
                answers = self.processor.batch_decode(new, skip_special_tokens=True)
                cache = backend.cache
                self.kv_bytes += cache.nbytes()
                longest = int(inputs["attention_mask"].sum(dim=1).max())  # as eval.py counts
                self.full_kv_bytes += len(chunk) * longest * cache.kv_bytes_per_token()
                for i, answer in zip(chunk, answers, strict=True):
                    results[i] = GenerationResult(text=_until(answer, kwargs.get("until")))
        logger.info(
            f"csp_inductor {self.policy!r}: KV held {self.kv_bytes / 2**20:.2f} MiB, "
            f"{self.kv_bytes / max(1, self.full_kv_bytes):.1%} of full caches"
        )
        return results


def _until(text: str, until) -> str:
    """``text`` cut at the first of the task's stop strings."""
    for stop in [until] if isinstance(until, str) else until or []:
        if stop:
            text = text.split(stop)[0]
    return text
