"""``python -m csp_inductor chat``: a conversation on one pruned cache, a turn per line of stdin.

With the built-in model the conversation opens on a VisualHaystack context (images and text
facts, ``--seed``); each line is a question in its vocabulary, and the model answers from
what the cache kept. ``--model PATH`` takes a local transformers model directory with its
tokenizer instead (text turns). After each turn the KV held is printed next to what the full
cache would hold.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import warnings
from typing import TextIO

import torch
from torch import Tensor


class Conversation:
    """Turns on one cache, the transformers way: every turn is sent to ``generate`` as the
    whole history plus the new tokens, with the previous turn's cache (which reports the tokens
    it has seen, so only the new ones are computed). Works on any model; on a model compiled
    by csp_inductor each turn is prefilled against the pruned cache and pruned itself."""

    def __init__(self, model, max_new_tokens: int = 16, **generate_kwargs):
        self.model = model
        self.kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, **generate_kwargs)
        self.ids: Tensor | None = None  # the conversation so far (batch, seen)
        self.mask: Tensor | None = None
        self.cache = None
        # transformers 5.24 renamed generate's past_key_values to cache
        names = inspect.signature(model.forward).parameters
        self.cache_arg = "cache" if "cache" in names else "past_key_values"

    def say(self, input_ids: Tensor, attention_mask: Tensor | None = None, **inputs) -> Tensor:
        """Send a turn (batch, t) (with its images' inputs, if any); the answer's new tokens."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if self.ids is not None:
            input_ids = torch.cat([self.ids, input_ids], dim=1)
            attention_mask = torch.cat([self.mask, attention_mask], dim=1)
        with torch.no_grad():
            out = self.model.generate(
                input_ids=input_ids, attention_mask=attention_mask, **{self.cache_arg: self.cache},
                return_dict_in_generate=True, **self.kwargs, **inputs,
            )  # fmt: skip
        answer = out.sequences[:, input_ids.shape[1] :]
        self.ids, self.cache = out.sequences, getattr(out, self.cache_arg)
        self.mask = torch.cat([attention_mask, torch.ones_like(answer)], dim=1)
        return answer


def held(model) -> str:
    """The KV a pruned cache holds after a turn (its first row), against the full cache."""
    cache = model.csp_backend.cache
    seen, per_token, rows = int(cache.seen), cache.kv_bytes_per_token(), cache.held[0]
    tokens, kept = cache.turns[-1]
    return (
        f"KV held {rows * per_token / 2**10:.1f} KiB: {rows} tokens of {seen} seen (this turn "
        f"kept {kept[0]} of {tokens[0]}"
        + (f"; re-pruned {cache.reprunes}x" if cache.reprunes else "")
        + f"); full cache {seen * per_token / 2**10:.1f} KiB; buffers "
        f"{cache.nbytes() / 2**10:.1f} KiB"
    )


def main(argv: list[str] | None = None, stdin: TextIO | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m csp_inductor chat", description=__doc__)
    p.add_argument(
        "--model", default=None,
        help="a local transformers model directory with its tokenizer (default: the built-in "
        "tiny LLaVA on a VisualHaystack context)",
    )  # fmt: skip
    p.add_argument("--policy", default="csp", help="policy spec, e.g. csp, snapkv, full")
    p.add_argument("--budget", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=7, help="the built-in model's context")
    p.add_argument("--task", default="cross_modal", help="the built-in context's task")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--max-cache-tokens", type=int, default=None, help="bound the cache")
    p.add_argument(
        "--prefill-chunk", type=int, default=None,
        help="stream the first prompt (the context) through the decoder this many tokens at a time",
    )  # fmt: skip
    p.add_argument("--compile", action="store_true", help="torch.compile the decoder")
    args = p.parse_args(argv)
    stdin = sys.stdin if stdin is None else stdin

    import csp_inductor

    from .evaluation import haystack as hs
    from .evaluation.eval import PolicySpec

    policy = PolicySpec.parse(args.policy).build(args.budget)
    options = dict(
        compile=args.compile, max_cache_tokens=args.max_cache_tokens,
        prefill_chunk=args.prefill_chunk,
    )  # fmt: skip
    if args.model is None:
        model = csp_inductor.compile(hs.load_builtin_model(), policy, **options)
        sample = hs.make_sample(args.task, args.seed, num_images=8, num_questions=3)
        context = sample.input_ids[: len(sample.input_ids) - hs.question_length(sample)]
        print(_context_text(context))
        questions = [sample.input_ids[len(context) :], *(q for q, _ in sample.followups)]
        print("questions it can answer:", " | ".join(hs.decode(q) for q in questions))
        chat = Conversation(model, args.max_new_tokens, eos_token_id=hs.EOS_TOKEN_ID)
        first, encode, decode = context[None], _haystack_encoder(), hs.decode
        images = dict(pixel_values=sample.pixel_values)
    else:
        model, tokenizer = _load(args.model)
        csp_inductor.compile(model, policy, **options)
        chat = Conversation(model, args.max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        first, images = None, {}

        def encode(text: str) -> Tensor:
            return tokenizer(text, return_tensors="pt", add_special_tokens=chat.ids is None)[
                "input_ids"
            ][0]

        def decode(ids: Tensor) -> str:
            return tokenizer.decode(ids, skip_special_tokens=True)

    # a turn of text has no image tokens to split its scores by (CSP says so once per run)
    warnings.filterwarnings("ignore", message="CSP: a prompt has no image tokens")
    print(f"policy {policy!r}; one turn per line, end with Ctrl-D")
    for line in stdin:
        if not line.strip():
            continue
        try:
            ids = encode(line)
        except KeyError as error:
            print(f"(not in the model's vocabulary: {error}; try one of the questions above)")
            continue
        if first is not None:  # the context opens the first turn
            ids, first = torch.cat([first[0], ids]), None
        answer = chat.say(ids[None], **images)
        images = {}
        print(f"> {decode(answer[0])}\n  {held(model)}", flush=True)
    return 0


def _context_text(context: Tensor) -> str:
    from .evaluation import haystack as hs

    words = hs.decode(context).split()
    out, run = [], 0
    for word in [*words, ""]:
        if word == "<image>":
            run += 1
            continue
        if run:
            out.append(f"[{run} image tokens]")
            run = 0
        out.append(word)
    return "context: " + " ".join(out).strip()


def _haystack_encoder():
    from .evaluation import haystack as hs

    def encode(text: str) -> Tensor:
        words = text.split()
        if words and words[-1] != "?":
            words.append("?")
        return torch.tensor([hs.TOKEN_TO_ID[w] for w in words], dtype=torch.long)

    return encode


def _load(path: str):
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoTokenizer,
    )

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    auto = AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
    model = auto.from_pretrained(path, local_files_only=True).eval()
    return model, AutoTokenizer.from_pretrained(path, local_files_only=True)
