"""Every bad input we know of, in one table: each raises a clear error that names the field, the
value and what is allowed (invariant 9). The fallbacks that replace an error (text-only
prompts, short prompts, padding when nothing is pruned, a compiler failure) are tested where
their behaviour is: test_backend.py, test_policies.py and test_reliability.py."""

import math

import pytest
import torch
from transformers import DynamicCache

import csp_inductor
from csp_inductor import CSP, H2O, Full, SnapKV
from csp_inductor.testing import random_prompt, tiny_inputs, tiny_model


@pytest.fixture(scope="module")
def model():
    """A tiny LLaVA through the eager backend (errors are raised before anything compiles)."""
    model = csp_inductor.compile(tiny_model("llava"), CSP(), compile=False)
    yield model
    csp_inductor.restore(model)


@pytest.fixture(scope="module")
def inputs(model):
    return tiny_inputs(model, "llava")


def scores(**overrides):
    p = random_prompt(2, 4, 2, 33, 8)
    args = dict(q_window=p.q[:, :, -7:], k=p.k, is_image=p.is_image) | overrides
    return csp_inductor.decomposed_scores(**args)


def select(policy=None, padding=None, **overrides):
    p = random_prompt(2, 4, 2, 40, 8)
    args = dict(q=p.q, k=p.k, is_image=p.is_image, key_padding=padding) | overrides
    return (policy or CSP()).select(**args)


def inner_padding():
    padding = torch.zeros(2, 40, dtype=torch.bool)
    padding[1, 10:13] = True
    return padding


def continued_dynamic_cache(model, inputs):
    cache = DynamicCache(config=model.config.text_config)
    cache.update(torch.zeros(1, 2, 3, 16), torch.zeros(1, 2, 3, 16), 0)
    model(**inputs, past_key_values=cache)


def compile_twice(model):
    csp_inductor.compile(model)


def assign(obj, name, value):
    setattr(obj, name, value)


# (id, call(model, inputs), exception, message pattern: the field, the value, what is allowed)
CASES = [
    # policies
    (
        "budget 0",
        lambda m, i: CSP(budget=0.0),
        ValueError,
        r"budget must be a number in \(0.0, 1.0\], got budget=0.0",
    ),
    ("budget 1.5", lambda m, i: CSP(budget=1.5), ValueError, r"budget must .* got budget=1.5"),
    ("budget bool", lambda m, i: CSP(budget=True), ValueError, "got budget=True"),
    ("budget nan", lambda m, i: SnapKV(budget=math.nan), ValueError, "got budget=nan"),
    ("h2o budget 2", lambda m, i: H2O(budget=2), ValueError, r"\(0.0, 1.0\], got budget=2"),
    (
        "window > budget",
        lambda m, i: CSP(budget=0.1, window_ratio=0.2),
        ValueError,
        r"window_ratio must be a number in \(0.0, 0.1\], got window_ratio=0.2",
    ),
    (
        "query_window -1",
        lambda m, i: CSP(query_window=-1),
        ValueError,
        r"query_window must be an int >= 0 \(0: no cap\) or None \(the default\), got "
        "query_window=-1",
    ),
    (
        "query_window float",
        lambda m, i: CSP(query_window=0.5),
        ValueError,
        r"query_window must be an int >= 0 \(0: no cap\) or None \(the default\), got "
        "query_window=0.5",
    ),
    (
        "query_window faithful",
        lambda m, i: CSP(faithful=True, query_window=64),
        ValueError,
        "faithful=True reproduces the authors' code, which scores with all",
    ),
    (
        "cross_ratio 1.2",
        lambda m, i: CSP(cross_ratio=1.2),
        ValueError,
        r"cross_ratio must be a number in \[0.0, 1.0\], got cross_ratio=1.2",
    ),
    (
        "recent_bias -1",
        lambda m, i: CSP(recent_bias=-1),
        ValueError,
        r"\[0.0, 1.0\], got recent_bias=-1",
    ),
    (
        "n negative",
        lambda m, i: CSP(n=-1.0),
        ValueError,
        "n must be a finite number >= 0, got n=-1.0",
    ),
    (
        "n inf",
        lambda m, i: CSP(n=math.inf),
        ValueError,
        "n must be a finite number >= 0, got n=inf",
    ),
    (
        "sink_tokens -1",
        lambda m, i: CSP(sink_tokens=-1),
        ValueError,
        "sink_tokens must be an int >= 0, got sink_tokens=-1",
    ),
    ("sink_tokens float", lambda m, i: CSP(sink_tokens=1.5), ValueError, "got sink_tokens=1.5"),
    (
        "faithful with sinks",
        lambda m, i: CSP(faithful=True, sink_tokens=4),
        ValueError,
        "no sink tokens; got sink_tokens=4",
    ),
    (
        "snapkv kernel even",
        lambda m, i: SnapKV(kernel_size=4),
        ValueError,
        "kernel_size must be an odd int >= 1, got kernel_size=4",
    ),
    (
        "unknown policy",
        lambda m, i: csp_inductor.make_policy("pyramidkv"),
        ValueError,
        r"unknown policy 'pyramidkv'; known policies: \['csp'",
    ),
    (
        "unknown option",
        lambda m, i: csp_inductor.make_policy("csp", hh=0.1),
        ValueError,
        r"no option\(s\) \['hh'\]; its options: \['budget'",
    ),
    # scoring and selection
    (
        "n_softmax n -1",
        lambda m, i: csp_inductor.n_softmax(torch.zeros(3), n=-1.0),
        ValueError,
        "n must be a finite number >= 0 .*got n=-1.0",
    ),
    (
        "n_softmax n nan",
        lambda m, i: csp_inductor.n_softmax(torch.zeros(3), n=math.nan),
        ValueError,
        "got n=nan",
    ),
    (
        "scores is_image length",
        lambda m, i: scores(is_image=torch.zeros(2, 5, dtype=torch.bool)),
        ValueError,
        r"is_image must be a bool tensor of shape \(2, 33\), got shape=\(2, 5\)",
    ),
    (
        "scores key_padding dtype",
        lambda m, i: scores(key_padding=torch.zeros(2, 33)),
        ValueError,
        r"key_padding must be a bool tensor .* dtype=torch.float32",
    ),
    (
        "scores window_mask",
        lambda m, i: scores(window_mask=torch.ones(2, 3, dtype=torch.bool)),
        ValueError,
        r"window_mask must be a bool tensor of shape \(2, 7\), got shape=\(2, 3\)",
    ),
    (
        "scores backend",
        lambda m, i: scores(backend="cuda"),
        ValueError,
        r"backend must be one of .*'triton'.*got backend='cuda'",
    ),
    ("scores n", lambda m, i: scores(n=-0.5), ValueError, "got n=-0.5"),
    (
        "scores heads",
        lambda m, i: csp_inductor.decomposed_scores(
            torch.randn(1, 3, 4, 8), torch.randn(1, 2, 10, 8), torch.zeros(1, 10, dtype=torch.bool)
        ),
        ValueError,
        "q_heads=3 must be a positive multiple of kv_heads=2",
    ),
    (
        "select is_image length",
        lambda m, i: select(is_image=torch.zeros(2, 39, dtype=torch.bool)),
        ValueError,
        r"is_image must be a bool tensor of shape \(batch, seq\) = \(2, 40\)",
    ),
    (
        "select seq mismatch",
        lambda m, i: select(q=torch.zeros(2, 4, 39, 8)),
        ValueError,
        r"same seq, got q.shape=\(2, 4, 39, 8\), k.shape=\(2, 2, 40, 8\)",
    ),
    # compile and the backend
    (
        "not a transformers model",
        lambda m, i: csp_inductor.compile(torch.nn.Linear(2, 2)),
        TypeError,
        r"cannot serve model_type=None \(Linear\): it is not a transformers model",
    ),
    (
        "policy string",
        lambda m, i: csp_inductor.compile(tiny_model("llava"), policy="csp"),
        TypeError,
        "policy must be a csp_inductor Policy .*got policy='csp'",
    ),
    (
        "policy assigned",
        lambda m, i: assign(m.csp_backend, "policy", "snapkv"),
        TypeError,
        "policy must be a csp_inductor Policy .*got policy='snapkv'",
    ),
    (
        "kernel",
        lambda m, i: csp_inductor.compile(tiny_model("llava"), kernel="cuda-graphs"),
        ValueError,
        r"kernel must be one of \('auto', 'sdpa', 'flex'\), got kernel='cuda-graphs'",
    ),
    (
        "decode_capacity 0",
        lambda m, i: csp_inductor.compile(tiny_model("llava"), decode_capacity=0),
        ValueError,
        "decode_capacity must be an int >= 1, got decode_capacity=0",
    ),
    (
        "decode_softmax_n 0",
        lambda m, i: csp_inductor.compile(tiny_model("llava"), decode_softmax_n=0.0),
        ValueError,
        "decode_softmax_n must be None .* or a finite number > 0, got decode_softmax_n=0.0",
    ),
    (
        "compiled twice",
        lambda m, i: compile_twice(m),
        ValueError,
        r"already compiled by csp_inductor; restore\(model\) first",
    ),
    (
        "restore uncompiled",
        lambda m, i: csp_inductor.restore(tiny_model("llava")),
        ValueError,
        "not compiled by csp_inductor",
    ),
    (
        "inputs_embeds only",
        lambda m, i: m(inputs_embeds=torch.randn(1, 40, 64)),
        ValueError,
        "needs input_ids .* with a prompt or a turn to know which of its tokens are visual; got "
        "inputs_embeds only",
    ),
    (
        "4D attention mask",
        lambda m, i: m(input_ids=i["input_ids"], attention_mask=torch.ones(1, 1, 2, 2)),
        ValueError,
        r"2D attention_mask \(batch, seq\); got Tensor\(1, 1, 2, 2\)",
    ),
    (
        "non-empty DynamicCache",
        lambda m, i: continued_dynamic_cache(m, i),
        TypeError,
        "cannot continue a non-empty DynamicCache",
    ),
    (
        "cache_implementation",
        lambda m, i: m.generate(**i, max_new_tokens=2, cache_implementation="offloaded"),
        ValueError,
        r"got cache_implementation='offloaded', allowed: None or one of \('static'",
    ),
]


@pytest.mark.parametrize(
    ("call", "error", "match"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_raises_a_clear_error(model, inputs, call, error, match):
    with pytest.raises(error, match=match):
        call(model, inputs)


def test_the_table_covers_at_least_25_bad_inputs():
    assert len(CASES) >= 25 and len({c[0] for c in CASES}) == len(CASES)


def test_both_cache_arguments_at_once(model, inputs):
    if model.csp_backend.cache_arg != "cache":
        pytest.skip("transformers < 5.24 has one cache argument")
    cache = model.csp_backend.new_cache()
    with pytest.raises(TypeError, match="got both 'cache' and 'past_key_values'; pass 'cache'"):
        model(**inputs, cache=cache, past_key_values=cache)


@pytest.mark.parametrize("policy", [Full(), CSP()], ids=repr)
def test_padding_inside_a_row_is_never_kept(policy):
    # a conversation turn of a padded batch has its padding between real tokens
    padding = inner_padding()
    kept = select(policy, padding)
    want = policy.budget_for(37).kept
    assert ((kept[1] >= 0).sum(dim=-1) == want).all()
    assert not set(kept[1].flatten().tolist()) & {10, 11, 12}
