"""What conversations and a bounded cache cost: a later turn's latency, and a long generation
under ``max_cache_tokens``.

The model is :func:`csp_inductor.testing.long_context_llava` (random weights, fp32,
``CSP_BENCH_CONV_MODEL``, default ``512,4,8,8``).

``test_turn``: a prompt of ``CSP_BENCH_CONV_CONTEXT`` tokens (default 8192, image-heavy), one
answer token, then a text turn of ``CSP_BENCH_CONV_TURN`` tokens (default 512) sent through
``generate`` with the previous cache, answered with one token. Timed: that second ``generate``
(the turn's prefill against the held cache, and its first token). Providers, interleaved round
by round (the prompt is prefilled again, untimed, before each round): ``unmodified``
(transformers, its dynamic cache), ``csp_eager`` and ``csp`` (compiled), both ``CSP(0.2)``.

``test_bounded_generation``: ``CSP_BENCH_CONV_NEW`` new tokens (default 2000) after a
``CSP_BENCH_CONV_PROMPT``-token prompt (default 1024), compiled ``CSP(0.2)`` with
``max_cache_tokens=CSP_BENCH_CONV_BOUND`` (default 512) against the same without a bound. A
logits processor records the cache's buffer bytes and held tokens and stamps every step; the
result holds the series (every 10th step), the re-prunes, and the median step time of both.
"""

from __future__ import annotations

import os
import statistics
import time

import torch
from conftest import env_int, record
from transformers import LogitsProcessorList

import csp_inductor
from csp_inductor.testing import image_heavy_prompt, long_context_llava

MODEL = tuple(int(x) for x in os.environ.get("CSP_BENCH_CONV_MODEL", "512,4,8,8").split(","))
CONTEXT = env_int("CSP_BENCH_CONV_CONTEXT", 8192)
TURN = env_int("CSP_BENCH_CONV_TURN", 512)
ROUNDS = env_int("CSP_BENCH_CONV_ROUNDS", 3)
PROMPT = env_int("CSP_BENCH_CONV_PROMPT", 1024)
NEW = env_int("CSP_BENCH_CONV_NEW", 2000)
BOUND = env_int("CSP_BENCH_CONV_BOUND", 512)
POLICY = csp_inductor.CSP(budget=0.2)


def _generate(model, **kwargs):
    with torch.no_grad():
        return model.generate(do_sample=False, return_dict_in_generate=True, **kwargs)


def _turn_seconds(model, prompt: dict, turn: torch.Tensor) -> float:
    """Seconds of the second ``generate``: the turn after a one-token answer to ``prompt``."""
    out = _generate(model, **prompt, max_new_tokens=1, min_new_tokens=1)
    ids = torch.cat([out.sequences, turn], dim=1)
    start = time.perf_counter()
    _generate(
        model, input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=1,
        min_new_tokens=1, past_key_values=out.past_key_values,
    )  # fmt: skip
    return time.perf_counter() - start


def test_turn(benchmark):
    models = {"unmodified": long_context_llava(*MODEL)}
    for name, compiled in (("csp_eager", False), ("csp", True)):
        models[name] = csp_inductor.compile(long_context_llava(*MODEL), POLICY, compile=compiled)
    prompt = image_heavy_prompt(models["unmodified"], CONTEXT)
    turn = torch.randint(3, 30000, (1, TURN), generator=torch.Generator().manual_seed(1))
    warm = image_heavy_prompt(models["unmodified"], 1024, seed=1)
    for model in models.values():  # compilation out of the rounds
        _turn_seconds(model, warm, turn[:, : TURN // 2])
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(ROUNDS):
        for name, model in models.items():
            times[name].append(_turn_seconds(model, prompt, turn))
    cache = models["csp"].csp_backend.cache
    result = {
        name: {
            "turn_ms": 1e3 * statistics.median(ts),
            "rounds_ms": [1e3 * t for t in ts],
            "vs_unmodified": statistics.median(
                t / u for t, u in zip(ts, times["unmodified"], strict=True)
            ),
        }
        for name, ts in times.items()
    }
    record(
        benchmark, provider="csp", providers=result, threads=torch.get_num_threads(),
        held_tokens=cache.rows[0], seen_tokens=int(cache.seen), turns=cache.turns,
        shapes={"model": MODEL, "context": CONTEXT, "turn": TURN, "dtype": "float32"},
    )  # fmt: skip
    benchmark.pedantic(_turn_seconds, args=(models["csp"], prompt, turn), rounds=1, iterations=1)


class CacheLog:
    """Per generation step: time stamp, the cache's buffer bytes, held tokens, re-prunes."""

    def __init__(self, model):
        self.model, self.steps = model, []

    def __call__(self, ids, scores):
        cache = self.model.csp_backend.cache
        self.steps.append((time.perf_counter(), cache.nbytes(), cache.rows[0], cache.reprunes))
        return scores


def _long_generation(model, prompt: dict) -> CacheLog:
    log = CacheLog(model)
    _generate(
        model, **prompt, max_new_tokens=NEW, min_new_tokens=NEW,
        logits_processor=LogitsProcessorList([log]),
    )  # fmt: skip
    return log


def test_bounded_generation(benchmark):
    bounded = csp_inductor.compile(long_context_llava(*MODEL), POLICY, max_cache_tokens=BOUND)
    unbounded = csp_inductor.compile(long_context_llava(*MODEL), POLICY)
    prompt = image_heavy_prompt(bounded, PROMPT)
    warm = image_heavy_prompt(bounded, PROMPT, seed=1)
    for model in (bounded, unbounded):  # compilation (and a re-prune) out of the timed runs
        _long_generation(model, warm)
    logs = {"bounded": _long_generation(bounded, prompt)}
    logs["unbounded"] = _long_generation(unbounded, prompt)
    result = {}
    for name, log in logs.items():
        gaps = [b[0] - a[0] for a, b in zip(log.steps, log.steps[1:], strict=False)]
        steps = log.steps[1:]
        reprune_gaps = [g for g, a, b in zip(gaps, log.steps, steps, strict=False) if b[3] > a[3]]
        sizes = [s[1] for s in log.steps]
        result[name] = {
            "median_step_ms": 1e3 * statistics.median(gaps),
            "mean_step_ms": 1e3 * statistics.mean(gaps),
            "reprunes": log.steps[-1][3],
            "reprune_step_ms": [1e3 * g for g in reprune_gaps],
            "buffer_bytes": {"min": min(sizes), "max": max(sizes)},
            "held_tokens_max": max(s[2] for s in log.steps),
            "series_every_10": [(i, s[1], s[2]) for i, s in enumerate(log.steps) if i % 10 == 0],
        }  # fmt: skip
    record(
        benchmark, provider="csp_bounded", providers=result, threads=torch.get_num_threads(),
        shapes={"model": MODEL, "prompt": PROMPT, "new_tokens": NEW, "bound": BOUND,
                "dtype": "float32"},
    )  # fmt: skip
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
