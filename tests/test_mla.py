"""Multi-head latent attention (MLA: DeepSeek V2/V3, Kimi K2.5, Mistral 4, ...).

The cache of an MLA layer holds the latent and the rotary key, one "head" for all query heads;
the backend scores in the latent space (weight absorption) and stores the kept latents:

- absorbed scores equal the per-head scores of the expanded keys summed over the heads;
- the stored latents are transformers' own latents at the kept positions, in every layer;
- the FlexAttention kernel serves MLA's narrower values exactly;
- an MLA module the backend cannot read is refused, naming what is missing.
"""

import inspect

import pytest
import torch
from transformers import DynamicCache

import csp_inductor
from csp_inductor import compat, decomposed_scores
from csp_inductor.model_layout import self_attention
from csp_inductor.testing import (
    assert_same_generation,
    greedy,
    placeholder_inputs,
    tiny_family_model,
)
from csp_inductor.transformers_attention import absorb

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(
        compat.BEFORE_5_3, reason="transformers < 5.3 caches MLA's per-head K/V (plain attention)"
    ),
]


@pytest.fixture(scope="module")
def kimi():
    """Kimi K2.5 (a DeepSeek V3 decoder), tiny: its first layer's attention and inputs."""
    model = tiny_family_model("kimi_k25")
    return model, placeholder_inputs(model, batch=2, pads=[0, 5])


def test_absorbed_scores_are_the_heads_scores_summed(kimi):
    model, _ = kimi
    attn = self_attention(model.model.language_model.layers[0])
    gen = torch.Generator().manual_seed(0)
    b, seq, heads = 2, 40, model.config.text_config.num_attention_heads
    query = torch.randn(b, heads, seq, attn.qk_nope_head_dim + attn.qk_rope_head_dim, generator=gen)
    kv_nope = torch.randn(b, 1, seq, attn.kv_lora_rank, generator=gen)
    k_rot = torch.randn(b, 1, seq, attn.qk_rope_head_dim, generator=gen)
    is_image = torch.zeros(b, seq, dtype=torch.bool)
    is_image[:, 10:25] = True
    window, scale = 12, attn.scaling
    with torch.no_grad():
        keys, _ = attn.expand_kv(kv_nope, k_rot)  # (b, heads, seq, nope + rope)
        per_head = decomposed_scores(query[:, :, -window:], keys, is_image, scale=scale)
        q_latent, k_latent = absorb(attn, query, kv_nope, k_rot)
    assert q_latent.shape == (b, heads, seq, attn.kv_lora_rank + attn.qk_rope_head_dim)
    shared = decomposed_scores(q_latent[:, :, -window:], k_latent, is_image, scale=scale)
    assert shared.shape == (b, 1, 2, seq)
    torch.testing.assert_close(shared, per_head.sum(dim=1, keepdim=True), rtol=1e-4, atol=1e-5)


def test_stored_latents_are_the_models_at_the_kept_positions(kimi):
    model, inputs = kimi
    ref = DynamicCache(config=model.config)  # the prompt's latents, as generate positions them
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=1, do_sample=False, **{name: ref})
    csp_inductor.compile(model, csp_inductor.CSP(budget=0.2), compile=False)
    try:
        greedy(model, inputs, 1)
        cache = model.csp_backend.cache
    finally:
        csp_inductor.restore(model)
    real = inputs["attention_mask"].sum(dim=1).tolist()
    assert cache.kept_prompt == [csp_inductor.CSP(budget=0.2).budget_for(n).kept for n in real]
    rank = model.config.text_config.kv_lora_rank
    rope = model.config.text_config.qk_rope_head_dim
    # per token, what transformers' cache holds: the latent and the rotary key, not per-head K/V
    ref_per_token = sum(
        (layer.keys[0, :, 0].numel() + layer.values[0, :, 0].numel()) * layer.keys.element_size()
        for layer in ref.layers
    )
    assert cache.kv_bytes_per_token() == ref_per_token == len(ref.layers) * (rank + rope) * 4
    for layer, want in zip(cache.pruned, ref.layers, strict=True):
        assert layer.keys.shape[1:] == (1, layer.keys.shape[2], rank)
        assert layer.values.shape[1:] == (1, layer.keys.shape[2], rope)
        for row, kept in enumerate(cache.kept_prompt):
            pos = layer.positions[row, 0, :kept]
            assert (pos >= 0).all() and len(set(pos.tolist())) == kept
            torch.testing.assert_close(layer.keys[row, 0, :kept], want.keys[row, 0, pos])
            torch.testing.assert_close(layer.values[row, 0, :kept], want.values[row, 0, pos])


def test_flex_kernel_is_exact(kimi):
    model, inputs = kimi
    ref = greedy(model, inputs, 4)
    csp_inductor.compile(model, csp_inductor.Full(), compile=False, kernel="flex")
    try:
        assert_same_generation(greedy(model, inputs, 4), ref)
    finally:
        csp_inductor.restore(model)


def test_unreadable_mla_module_is_refused():
    model = tiny_family_model("deepseek_v3")
    layer = self_attention(model.model.layers[1])
    layer.kv_b_proj.bias = torch.nn.Parameter(torch.zeros(layer.kv_b_proj.out_features))
    with pytest.raises(TypeError, match=r"layer 1 caches a multi-head latent.*kv_b_proj"):
        csp_inductor.compile(model)
    assert getattr(model, "csp_backend", None) is None
