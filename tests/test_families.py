"""Invariant 1 (keep-all is exact) for every supported model family, on tiny random models.

Greedy ``generate`` through the backend with ``Full()`` or ``CSP(budget=1.0)`` must give the
unmodified (sdpa) model's tokens, batch 1 and batch 3 with left padding; the per-step logits
are compared too, so a small masking error is caught even when it does not flip a token.
``CSP()`` must run and store fewer bytes; ``restore`` must bring back the original model.
"""

import pytest
import torch

import csp_inductor
from csp_inductor.testing import (
    FAMILIES,
    assert_same_generation,
    greedy,
    tiny_inputs,
    tiny_model,
)

NEW_TOKENS = 8
PADS = [0, 3, 7]
BATCHES = {"b1": (1, None), "b3": (3, PADS)}


def generate(model, inputs):
    return greedy(model, inputs, NEW_TOKENS)


def text_attn(model):
    config = model.config
    return getattr(config, "text_config", config)._attn_implementation


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    """The family, its inputs and the unmodified model's outputs (batch 1 and 3)."""
    name = request.param
    model = tiny_model(name)
    inputs = {key: tiny_inputs(model, name, batch=b, pads=p) for key, (b, p) in BATCHES.items()}
    refs = {key: generate(model, inputs[key]) for key in BATCHES}
    return name, inputs, refs


@pytest.mark.parametrize("batch", list(BATCHES))
def test_full_is_exact(family, batch):
    name, inputs, refs = family
    model = csp_inductor.compile(tiny_model(name), csp_inductor.Full(), compile=False)
    assert_same_generation(generate(model, inputs[batch]), refs[batch])


def test_csp_budget_one_is_exact(family):
    name, inputs, refs = family
    model = csp_inductor.compile(tiny_model(name), csp_inductor.CSP(budget=1.0), compile=False)
    for batch in BATCHES:
        assert_same_generation(generate(model, inputs[batch]), refs[batch])


def test_csp_stores_fewer_bytes(family):
    name, inputs, _ = family
    model = csp_inductor.compile(tiny_model(name), csp_inductor.Full(), compile=False)
    generate(model, inputs["b3"])
    full_bytes = model.csp_backend.cache.nbytes()
    csp_inductor.restore(model)
    csp_inductor.compile(model, csp_inductor.CSP(), compile=False)
    tokens, logits = generate(model, inputs["b3"])
    assert tokens.shape == (3, NEW_TOKENS)
    assert torch.isfinite(logits).all()
    cache = model.csp_backend.cache
    assert cache.nbytes() < full_bytes
    lengths = [len(row) - pad for row, pad in zip(inputs["b3"]["input_ids"], PADS, strict=True)]
    assert all(kept < n for kept, n in zip(cache.kept_prompt, lengths, strict=True))


def test_restore_brings_back_the_model(family):
    name, inputs, refs = family
    model = tiny_model(name)
    before = text_attn(model)
    csp_inductor.compile(model, csp_inductor.CSP(budget=0.3), compile=False)
    assert text_attn(model) == "csp_inductor"
    generate(model, inputs["b3"])
    csp_inductor.restore(model)
    assert text_attn(model) == before == "sdpa"
    assert getattr(model, "csp_backend", None) is None
    assert_same_generation(generate(model, inputs["b3"]), refs["b3"])


@pytest.mark.parametrize("name", ["llava", "qwen2_vl"])
def test_compiled_full_is_exact(name):
    model = tiny_model(name)
    inputs = tiny_inputs(model, name, batch=3, pads=PADS)
    ref = generate(model, inputs)
    csp_inductor.compile(model, csp_inductor.Full())
    assert_same_generation(generate(model, inputs), ref)


def test_gemma3_images_causal_without_token_types():
    # Gemma3 makes an image's tokens attend to each other only when given token_type_ids
    model = tiny_model("gemma3")
    inputs = tiny_inputs(model, "gemma3", batch=3, pads=PADS)
    del inputs["token_type_ids"]
    ref = generate(model, inputs)
    csp_inductor.compile(model, csp_inductor.Full(), compile=False)
    assert_same_generation(generate(model, inputs), ref)


def test_flex_kernel_is_exact_with_sliding_window_and_images():
    # the FlexAttention masks (padding, sliding window, bidirectional images), eager
    model = tiny_model("gemma3")
    inputs = tiny_inputs(model, "gemma3", batch=3, pads=PADS)
    ref = generate(model, inputs)
    csp_inductor.compile(model, csp_inductor.Full(), compile=False, kernel="flex")
    assert_same_generation(generate(model, inputs), ref)
