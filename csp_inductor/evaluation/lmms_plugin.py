"""An lmms-eval model: any transformers VLM ``compile`` supports, pruned by a csp_inductor policy.

Registered through lmms-eval's ``lmms_eval.models`` entry points (``pip install -e .[lmms]``;
:mod:`.lmms_entry`), so lmms-eval runs it without a fork::

    lmms-eval --model csp_inductor --model_args pretrained=PATH,policy=csp,budget=0.2 \\
        --batch_size 8 --tasks visual_haystack_csp \\
        --include_path csp_inductor/evaluation/lmms_tasks

``policy`` is a policy's short name (``full``, ``csp``, ``snapkv``, …) and every other model
argument that is not the model's is that policy's option (``budget``, ``window_ratio``, ``n``,
…). Prompts are batched (left-padded) and answered greedily; the KV bytes the pruned caches
held, and what full caches of the same prompts would hold, are logged after each
``generate_until`` call (every task of a run) and kept in :attr:`CSPInductor.kv_bytes` /
:attr:`CSPInductor.full_kv_bytes`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms
from lmms_eval.protocol import ChatMessages
from loguru import logger

import csp_inductor

from ..policies import POLICIES, Oracle, make_policy
from . import haystack as hs

BUILTIN = "builtin"  # pretrained=builtin: the shipped tiny LLaVA
MAX_NEW_TOKENS = 1024  # when a task sets none (lmms-eval's transformers models' default)


class CSPInductor(lmms):
    """lmms-eval chat model: greedy ``generate`` of a VLM under :func:`csp_inductor.compile`.

    Args:
        pretrained: a model directory or hub id (``AutoModelForImageTextToText``), or
            ``builtin`` for the shipped tiny LLaVA.
        policy: the policy's short name; its options come as further keyword arguments.
        compile: torch.compile the decoder (off by default: evaluation prompts vary in length).
        prefill_chunk, max_cache_tokens: :func:`csp_inductor.compile`'s (a prompt streamed
            through the decoder that many tokens at a time; a hard cap on the cache).
        dtype: the weights' dtype (``auto``: as stored; the built-in model is fp32).
        batch_size, device: lmms-eval's ``--batch_size`` (prompts per ``generate`` call) and
            ``--device``.
    """

    is_simple = False

    def __init__(
        self,
        pretrained: str = BUILTIN,
        policy: str = "csp",
        compile: bool = False,
        prefill_chunk: int | None = None,
        max_cache_tokens: int | None = None,
        dtype: str = "auto",
        batch_size: int | str | None = 1,
        device: str | None = None,
        max_batch_size: int | None = None,  # (lmms-eval passes it to every model)
        **options,
    ) -> None:
        super().__init__()
        if policy not in POLICIES or POLICIES[policy] is Oracle:
            known = sorted(name for name, cls in POLICIES.items() if cls is not Oracle)
            raise ValueError(f"policy={policy!r} is not a policy lmms-eval can run; known: {known}")
        self.policy = make_policy(policy, **options)
        if not isinstance(compile, bool):
            raise ValueError(f"compile must be true or false, got compile={compile!r}")
        self.batch_size = _batch_size(batch_size)
        from transformers import AutoModelForImageTextToText, AutoProcessor

        path = hs.BUILTIN_MODEL_PATH if pretrained == BUILTIN else pretrained
        if Path(path) == hs.BUILTIN_MODEL_PATH:
            if dtype != "auto":
                raise ValueError(f"the built-in model is fp32: dtype must be auto, got {dtype!r}")
            self.model = hs.load_builtin_model(path)
        else:
            self.model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=dtype)
        self.model = self.model.to(device or "cpu").eval()
        self.processor = AutoProcessor.from_pretrained(str(path))
        self.processor.tokenizer.padding_side = "left"
        csp_inductor.compile(
            self.model, self.policy, compile=compile, prefill_chunk=prefill_chunk,
            max_cache_tokens=max_cache_tokens,
        )  # fmt: skip
        self.kv_bytes = 0  # what the pruned caches held, summed over batches
        self.full_kv_bytes = 0  # what full caches of the same prompts would have held

    @property
    def device(self) -> torch.device:
        """Where the model is (lmms-eval's evaluator puts its cross-process counts there)."""
        return self.model.device

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

    def inputs(self, chats: list[list[dict]]):
        """The processor's batch for chats of lmms-eval messages: each chat's text (the
        processor's chat template, or its parts joined, each image as the processor's image
        token) with its own images, left-padded. Special tokens are added unless every text
        starts with the tokenizer's BOS already (as transformers' ``apply_chat_template``
        decides)."""
        texts, images = [], []
        for messages in chats:
            chat = ChatMessages(messages=messages)
            own, videos, _ = chat.extract_media()
            if videos:
                raise ValueError("the csp_inductor lmms-eval model takes images, not videos")
            if getattr(self.processor, "chat_template", None):
                texts.append(
                    self.processor.apply_chat_template(
                        chat.to_hf_messages(), tokenize=False, add_generation_prompt=True
                    )
                )
            else:
                token = self.processor.image_token
                contents = [c for message in chat.messages for c in message.content]
                texts.append(" ".join(c.text if c.type == "text" else token for c in contents))
            images.append(own)
        bos = self.processor.tokenizer.bos_token
        return self.processor(
            text=texts, images=images if any(images) else None, padding=True, return_tensors="pt",
            add_special_tokens=not (bos and all(t.startswith(bos) for t in texts)),
        ).to(self.model.device)  # fmt: skip

    @torch.no_grad()
    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        results: list[GenerationResult | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):  # one generation config per batch
            groups.setdefault(repr(sorted(request.args[2].items())), []).append(i)
        backend, tokenizer = self.model.csp_backend, self.processor.tokenizer
        for order in groups.values():
            kwargs = requests[order[0]].args[2]
            _check_greedy(kwargs)
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                chats = []
                for i in chunk:
                    _, to_messages, _, doc_id, task, split = requests[i].args
                    chats.append(to_messages(self.task_dict[task][split][doc_id]))
                inputs = self.inputs(chats)
                out = self.model.generate(
                    **inputs, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                    max_new_tokens=int(kwargs.get("max_new_tokens") or MAX_NEW_TOKENS),
                )  # fmt: skip
                cache = backend.cache
                self.kv_bytes += cache.nbytes()
                longest = int(inputs["attention_mask"].sum(dim=1).max())  # as eval.py counts
                self.full_kv_bytes += len(chunk) * longest * cache.kv_bytes_per_token()
                new = out[:, inputs["input_ids"].shape[1] :]
                for i, text in zip(chunk, tokenizer.batch_decode(new), strict=True):
                    answer = _without_special(_until(text, kwargs.get("until")), tokenizer)
                    results[i] = GenerationResult(text=answer)
        logger.info(
            f"csp_inductor {self.policy!r}: KV held {self.kv_bytes / 2**20:.2f} MiB, "
            f"{self.kv_bytes / max(1, self.full_kv_bytes):.1%} of full caches"
        )
        return results


def _batch_size(value) -> int:
    if value is None:
        return 1
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"batch_size must be an int >= 1 (no 'auto'), got batch_size={value!r}")
    return value


def _check_greedy(kwargs: dict) -> None:
    """The model decodes greedily; a task asking for sampling or beams is refused."""
    sampling = kwargs.get("do_sample") or (kwargs.get("temperature") or 0) > 0
    if sampling or (kwargs.get("num_beams") or 1) > 1:
        raise ValueError(
            "the csp_inductor lmms-eval model decodes greedily (one beam); the task asks for "
            f"do_sample={kwargs.get('do_sample')}, temperature={kwargs.get('temperature')}, "
            f"num_beams={kwargs.get('num_beams')}"
        )


def _until(text: str, until) -> str:
    """``text`` cut at the first of the task's stop strings (special tokens included)."""
    for stop in [until] if isinstance(until, str) else until or []:
        if stop:
            text = text.split(stop)[0]
    return text


def _without_special(text: str, tokenizer) -> str:
    for token in tokenizer.all_special_tokens:
        text = text.replace(token, "")
    return text.strip()
