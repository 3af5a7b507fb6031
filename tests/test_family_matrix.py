"""Every family the backend serves, built tiny from transformers' own config defaults.

Per family (decoder with text and image placeholder tokens, no pixels: the vision tower is the
model's, the decoder and its cache are ours), through greedy ``generate``:

- ``Full()`` (batch 1) and ``CSP(budget=1.0)`` (batch 2, left padding) give the unmodified
  model's tokens and logits, eagerly;
- ``CSP(budget=0.2)`` keeps the policy's count (≈20%) of every row's real tokens in every
  attention layer: distinct real prompt positions, then the generated tokens, in buffers
  sized for exactly that; recurrent layers hold transformers' own state layer, shared ones
  nothing;
- compiled, ``Full()`` on the padded batch matches the model, and a second prompt of another
  length compiles no new graph.
"""

import os

import pytest
import torch
import transformers

import csp_inductor
from csp_inductor import compat
from csp_inductor.cache_layer import PrunedLayer
from csp_inductor.compat import DummyLayer, LinearAttentionLayer
from csp_inductor.testing import (
    assert_same_generation,
    greedy,
    known_model_types,
    placeholder_inputs,
    tiny_family_model,
)

NEW_TOKENS = 6
PADS = [0, 5]
MATRIX = (
    "aria", "aya_vision", "cohere2_vision", "deepseek_vl", "exaone4_5", "gemma3", "gemma3n_text",
    "gemma4", "glm4v", "got_ocr2", "hyperclovax_vision_v2", "idefics2", "idefics3", "internvl",
    "kimi_k25", "lfm2_vl", "lighton_ocr", "llama4_text", "llava", "llava_next", "llava_next_video",
    "llava_onevision", "minicpmv4_6", "mistral3", "mistral4", "molmo2", "paligemma",
    "qianfan_ocr", "qwen2_vl", "qwen2_5_vl", "qwen3_5", "qwen3_5_moe", "qwen3_vl", "qwen3_vl_moe",
    "shieldgemma2", "smolvlm", "video_llama_3", "video_llava", "vipllava",
)  # fmt: skip
# Compiled in every run: one family per kind of decoder (plain; sliding windows and the model's
# own bidirectional image mask; prefix mask; multimodal rotary with token types; short-conv
# hybrid; shared K/V; linear-attention hybrid; latent attention; chunked attention).
# CSP_COMPILE_ALL_FAMILIES=1 compiles them all.
COMPILED = (
    "llava", "gemma3", "paligemma", "qwen3_vl", "lfm2_vl", "gemma4", "qwen3_5", "kimi_k25",
    "llama4_text",
)  # fmt: skip
# Families the backend refuses, and the reason it gives.
REFUSED = {
    "mllama": "only as cross-attention K/V",
    "idefics": "only as cross-attention K/V",
    "deepseek_v32": "'indexed_attention'",
    "blip-2": r"\(OPTModel, from get_decoder\(\)\) has no `.layers`",
    "pix2struct": r"\(Pix2StructTextModel, from get_decoder\(\)\) has no `.layers`",
    "kosmos-2": "no placeholder token id",
}


# Families with recurrent layers, whose state transformers < 5.3 keeps in model-specific caches
RECURRENT = ("lfm2_vl", "qwen3_5", "qwen3_5_moe")


def generate(model, inputs):
    return greedy(model, inputs, NEW_TOKENS)


def skip_unless_served(model_type: str) -> None:
    if not known_model_types(model_type):
        pytest.skip(f"transformers {transformers.__version__} has no {model_type!r}")
    if LinearAttentionLayer is None and model_type in RECURRENT:
        pytest.skip("recurrent layers need transformers >= 5.3 (refused, tested below)")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=MATRIX)
def family(request):
    """A tiny model of the family, its inputs and the unmodified model's outputs."""
    skip_unless_served(request.param)
    model = tiny_family_model(request.param)
    inputs = {
        "b1": placeholder_inputs(model),
        "b2": placeholder_inputs(model, batch=2, pads=PADS),
        "b2_long": placeholder_inputs(model, batch=2, pads=PADS, length=120, seed=1),
    }
    refs = {key: generate(model, value) for key, value in inputs.items()}
    return model, inputs, refs


def test_keep_all_is_exact(family):
    model, inputs, refs = family
    csp_inductor.compile(model, csp_inductor.Full(), compile=False)
    try:
        assert_same_generation(generate(model, inputs["b1"]), refs["b1"])
        model.csp_backend.policy = csp_inductor.CSP(budget=1.0)
        assert_same_generation(generate(model, inputs["b2"]), refs["b2"])
        model.csp_backend.policy = csp_inductor.Full()
        generate(model, inputs["b2"])
        full_bytes = model.csp_backend.cache.nbytes()
        policy = model.csp_backend.policy = csp_inductor.CSP(budget=0.2)
        tokens, logits = generate(model, inputs["b2"])
        cache, family = model.csp_backend.cache, model.csp_backend.layout
    finally:
        csp_inductor.restore(model)
    assert tokens.shape == (2, NEW_TOKENS) and torch.isfinite(logits).all()
    length = inputs["b2"]["input_ids"].shape[1]
    real = inputs["b2"]["attention_mask"].sum(dim=1).tolist()
    kept = cache.kept_prompt
    assert kept == [policy.budget_for(n).kept for n in real]
    assert all(0.15 * n <= k <= 0.25 * n for k, n in zip(kept, real, strict=True))
    # every attention layer holds the kept tokens plus the decode room, the Full cache all
    per_token = cache.kv_bytes_per_token() * len(real)
    assert cache.nbytes() == per_token * (max(kept) + NEW_TOKENS)
    assert full_bytes == per_token * (max(real) + NEW_TOKENS)
    # what each row of each attention layer stores: distinct real prompt positions, then the
    # generated tokens' positions, then nothing
    kinds = {"attention": PrunedLayer, "recurrent": LinearAttentionLayer, "shared": DummyLayer}
    for layer, kind in zip(cache.layers, family.layer_types, strict=True):
        assert isinstance(layer, kinds.get(kind, DummyLayer))
    for layer in cache.pruned:
        for b, (k, n) in enumerate(zip(kept, real, strict=True)):
            for row in layer.positions[b].tolist():
                prompt = row[:k]
                assert len(set(prompt)) == k and all(length - n <= p < length for p in prompt)
                generated = list(range(length, length + NEW_TOKENS - 1))
                assert row[k : k + NEW_TOKENS - 1] == generated
                assert set(row[k + NEW_TOKENS - 1 :]) <= {-1}


def test_compiled_is_exact_without_recompiling(family):
    model, inputs, refs = family
    if model.config.model_type not in COMPILED and not os.environ.get("CSP_COMPILE_ALL_FAMILIES"):
        pytest.skip("compiled for one family per kind of decoder (CSP_COMPILE_ALL_FAMILIES=1: all)")
    csp_inductor.compile(model, csp_inductor.Full())
    try:
        assert_same_generation(generate(model, inputs["b2"]), refs["b2"])
        graphs = model.csp_backend.graphs
        assert graphs > 0
        assert_same_generation(generate(model, inputs["b2_long"]), refs["b2_long"])
        assert model.csp_backend.graphs == graphs
        assert model.csp_backend.fallback is None
    finally:
        csp_inductor.restore(model)


@pytest.mark.parametrize("model_type", sorted(REFUSED))
def test_unsupported_family_is_refused_with_the_reason(model_type):
    skip_unless_served(model_type)
    model = tiny_family_model(model_type)
    with pytest.raises(
        TypeError, match=f"cannot serve model_type='{model_type}'.*{REFUSED[model_type]}"
    ):
        csp_inductor.compile(model)
    assert getattr(model, "csp_backend", None) is None


@pytest.mark.skipif(LinearAttentionLayer is not None, reason="transformers >= 5.3 serves them")
@pytest.mark.parametrize("model_type", RECURRENT)
def test_recurrent_layers_are_refused_before_transformers_5_3(model_type):
    model = tiny_family_model(model_type)
    with pytest.raises(TypeError, match=r"recurrent layers need transformers >= 5\.3"):
        csp_inductor.compile(model)
    assert getattr(model, "csp_backend", None) is None


@pytest.mark.skipif(not compat.BEFORE_5_3, reason="transformers >= 5.3 caches the latent")
def test_mla_caching_per_head_kv_is_served_as_attention():
    model = tiny_family_model("deepseek_v3")
    inputs = placeholder_inputs(model, batch=2, pads=PADS)
    want = generate(model, inputs)
    csp_inductor.compile(model, csp_inductor.Full(), compile=False)
    assert not any(spec.latent for spec in model.csp_backend.layer_specs())
    assert_same_generation(generate(model, inputs), want)
