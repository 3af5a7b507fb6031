"""Decode speed per token inside ``generate``, providers interleaved in one process, against the
machine's memory-bandwidth bound.

The model is :func:`csp_inductor.testing.long_context_llava` (random weights, fp32) with an
image-heavy prompt of ``CSP_BENCH_TOKENS_CONTEXT`` tokens (default 8192). Providers:

- ``full``: unmodified transformers (sdpa) decoding from its full cache;
- ``kept``: unmodified transformers decoding from a cache holding as many tokens as CSP keeps
  (the prompt cut to that length). It is the decode step of any method that keeps the same
  count in transformers' own cache and attention, as hook libraries do (kvpress);
- ``kvpress`` (where NVIDIA kvpress is installed: ``make bench-peers``): unmodified transformers
  under ``SnapKVPress(compression_ratio=1 - budget)``, kvpress's hooks pruning the prompt in
  transformers' own cache, as its users run it;
- ``csp_eager``: ``csp_inductor.compile(model, CSP(budget), compile=False)``;
- ``csp``: ``csp_inductor.compile(model, CSP(budget))`` (compiled, the default);
- ``csp_<rule>`` for each rule of ``CSP_BENCH_TOKENS_LAYERS`` (e.g. ``pyramid,adaptive``;
  default none): ``CSP(budget, layers=rule)``, compiled: the same total budget shared among
  the layers; its ratio to ``csp`` (``vs_uniform``) is the cost of layers of their own counts;
- ``csp_q<N>`` for each N of ``CSP_BENCH_TOKENS_QUERY_WINDOWS`` (e.g. ``0``: the paper's
  uncapped window; default none): ``CSP(budget, query_window=N)``, compiled; its
  ``prefill_vs_csp`` is its prefill's median per-round ratio to ``csp``'s.

Each round runs one ``generate`` of ``CSP_BENCH_TOKENS_NEW`` tokens per provider, in turn; a
logits processor stamps every token and a round's figure is the median gap between
consecutive tokens. Reported per provider: the median over rounds (ms/token), the median of the
per-round ratios to ``kept`` (and to ``kvpress``) and, for ``csp``, to ``csp_eager``; the
prefill (the call to the first token's logits: the prompt's forward, pruning included) and its
median per-round ratio to ``full``'s, the unpruned prefill; and the
bytes bound: the bytes a step must read (the decoder's and the LM head's weights, one
embedding row, the KV the step attends over: the static buffers' capacity for CSP) divided by
the read bandwidth this process measures (a sum over a 512 MiB tensor, best of 5, after every
round; the median of the rounds).

Sizes: ``CSP_BENCH_TOKENS_MODELS`` ("hidden,layers,heads,kv_heads" list, default
``512,4,8,8;1024,4,16,4``: an MHA and a GQA shape), ``CSP_BENCH_TOKENS_THREADS`` (default
``0,1``; 0 = one thread per CPU core of the machine), ``CSP_BENCH_TOKENS_ROUNDS`` (3),
``CSP_BENCH_BUDGET`` (0.2).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time

import pytest
import torch
from conftest import TokenClock, env_int, env_ints, read_bandwidth, record, step_weight_bytes
from transformers import LogitsProcessorList

import csp_inductor
from csp_inductor.testing import image_heavy_prompt, long_context_llava

try:
    import kvpress
except ImportError:  # kvpress needs transformers < 5.3: make bench-peers
    kvpress = None

CONTEXT = env_int("CSP_BENCH_TOKENS_CONTEXT", 8192)
NEW = env_int("CSP_BENCH_TOKENS_NEW", 32)
ROUNDS = env_int("CSP_BENCH_TOKENS_ROUNDS", 3)
BUDGET = float(os.environ.get("CSP_BENCH_BUDGET", "0.2"))
THREADS = env_ints("CSP_BENCH_TOKENS_THREADS", "0,1")
LAYER_RULES = [r for r in os.environ.get("CSP_BENCH_TOKENS_LAYERS", "").split(",") if r]
QUERY_WINDOWS = env_ints("CSP_BENCH_TOKENS_QUERY_WINDOWS", "")
MODELS = [
    tuple(int(x) for x in shape.split(","))
    for shape in os.environ.get("CSP_BENCH_TOKENS_MODELS", "512,4,8,8;1024,4,16,4").split(";")
]


def _kv_bytes_per_token(model) -> int:
    cfg = model.config.text_config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 4


def _generate(model, inputs, press=None) -> tuple[float, float]:
    """One ``generate``: its prefill (seconds from the call to the first token's logits) and
    its decode (median ms between consecutive tokens)."""
    clock = TokenClock()
    with contextlib.nullcontext() if press is None else press(model):
        start = time.perf_counter()
        model.generate(
            **inputs, max_new_tokens=NEW, do_sample=False,
            logits_processor=LogitsProcessorList([clock]),
        )  # fmt: skip
    gaps = [b - a for a, b in zip(clock.stamps, clock.stamps[1:], strict=False)]
    return clock.stamps[0] - start, 1e3 * statistics.median(gaps)


def _held_by_press(model, inputs, press) -> int:
    """Tokens kvpress's cache holds after the prompt (a one-token ``generate`` runs the prefill
    only); measured, since its count rounds differently from ours."""
    with press(model):
        out = model.generate(
            **inputs, max_new_tokens=1, do_sample=False, return_dict_in_generate=True
        )
    return int(out.past_key_values.get_seq_length())


@pytest.mark.parametrize("threads", THREADS, ids=lambda t: f"threads{t or 'default'}")
@pytest.mark.parametrize("shape", MODELS, ids=lambda s: "h{}-l{}-q{}-kv{}".format(*s))
def test_decode_per_token(benchmark, shape, threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or os.cpu_count())
    try:
        _run(benchmark, shape)
    finally:
        torch.set_num_threads(previous)


def _run(benchmark, shape):
    policy = csp_inductor.CSP(budget=BUDGET)
    full = long_context_llava(*shape)
    models = {"full": full, "kept": full}  # one model, two prompts (three with kvpress)
    presses = {}
    if kvpress is not None:
        models["kvpress"] = full
        presses["kvpress"] = kvpress.SnapKVPress(compression_ratio=1 - BUDGET)
    for name, compiled in (("csp_eager", False), ("csp", True)):
        models[name] = csp_inductor.compile(long_context_llava(*shape), policy, compile=compiled)
    variants = {f"csp_{rule}": {"layers": rule} for rule in LAYER_RULES}
    variants |= {f"csp_q{n}": {"query_window": n} for n in QUERY_WINDOWS}
    for name, options in variants.items():
        variant = csp_inductor.CSP(budget=BUDGET, **options)
        models[name] = csp_inductor.compile(long_context_llava(*shape), variant)
    prompt = image_heavy_prompt(full, CONTEXT)
    kept = policy.budget_for(prompt["input_ids"].shape[1]).kept
    inputs = {name: prompt for name in models}
    inputs["kept"] = image_heavy_prompt(full, kept)
    warm = image_heavy_prompt(full, 1024, seed=1)
    for model in models.values():
        # no end-of-sequence token: every generate makes NEW tokens without min_new_tokens,
        # whose logits processors scan the vocabulary at every step (~0.5 ms here), a cost of
        # the benchmark and not of any provider
        model.generation_config.eos_token_id = None
    for name, model in models.items():  # compilation and first-touch costs out of the rounds
        _generate(model, warm, presses.get(name))
    times: dict[str, list[float]] = {name: [] for name in models}
    prefills: dict[str, list[float]] = {name: [] for name in models}
    bandwidths = []  # measured every round, like the providers: the machine's varies
    for _ in range(ROUNDS):
        for name, model in models.items():
            prefill, ms = _generate(model, inputs[name], presses.get(name))
            prefills[name].append(prefill)
            times[name].append(ms)
        bandwidths.append(read_bandwidth())
    bandwidth = statistics.median(bandwidths)
    weights, per_token = step_weight_bytes(full), _kv_bytes_per_token(full)
    capacity = models["csp"].csp_backend.cache.layers[0].keys.shape[2]
    lengths = {name: int(x["input_ids"].shape[1]) for name, x in inputs.items()}
    kv_tokens = {"full": lengths["full"], "kept": lengths["kept"], "csp_eager": capacity,
                 "csp": capacity}  # fmt: skip
    for name in variants:  # the layers' buffers, per layer on average
        layers = models[name].csp_backend.cache.pruned
        kv_tokens[name] = sum(layer.keys.shape[2] for layer in layers) / len(layers)
    if "kvpress" in models:
        kv_tokens["kvpress"] = _held_by_press(full, prompt, presses["kvpress"])
    result = {}
    for name, ts in times.items():
        read = weights + kv_tokens[name] * per_token
        ms = statistics.median(ts)
        result[name] = {
            "ms_per_token": ms,
            "rounds_ms": ts,
            "bytes_per_step": read,
            "bound_ms": 1e3 * read / bandwidth,
            "vs_bound": ms / (1e3 * read / bandwidth),
            "speedup_vs_kept": statistics.median(
                k / t for k, t in zip(times["kept"], ts, strict=True)
            ),
            "prefill_s": statistics.median(prefills[name]),
            "prefill_rounds_s": prefills[name],
        }  # fmt: skip
        if name != "kept":  # (its prompt is the kept tokens only)
            result[name]["prefill_vs_full"] = statistics.median(
                p / f for p, f in zip(prefills[name], prefills["full"], strict=True)
            )
    for rule in LAYER_RULES:
        result[f"csp_{rule}"]["vs_uniform"] = statistics.median(
            t / u for t, u in zip(times[f"csp_{rule}"], times["csp"], strict=True)
        )
    for n in QUERY_WINDOWS:
        result[f"csp_q{n}"]["prefill_vs_csp"] = statistics.median(
            p / c for p, c in zip(prefills[f"csp_q{n}"], prefills["csp"], strict=True)
        )
    result["csp"]["speedup_vs_eager"] = statistics.median(
        e / c for e, c in zip(times["csp_eager"], times["csp"], strict=True)
    )
    if "kvpress" in times:
        for name in ("csp", "csp_eager"):
            result[name]["speedup_vs_kvpress"] = statistics.median(
                k / t for k, t in zip(times["kvpress"], times[name], strict=True)
            )
    record(
        benchmark, provider="csp", providers=result, read_bandwidth=bandwidth,
        read_bandwidth_rounds=bandwidths,
        threads=torch.get_num_threads(), budget=BUDGET, kept=kept, capacity=capacity,
        kv_tokens=kv_tokens,
        shapes={"model": dict(zip(("hidden", "layers", "heads", "kv_heads"), shape, strict=True)),
                "context": lengths["full"], "new_tokens": NEW, "dtype": "float32"},
    )  # fmt: skip
    # pytest-benchmark's own figure: one whole CSP generate
    benchmark.pedantic(_generate, args=(models["csp"], inputs["csp"]), rounds=1, iterations=1)
