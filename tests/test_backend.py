"""The backend on a tiny LLaVA: compaction = masking, one graph, memory, positions, errors."""

import math
import warnings

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import (
    AttentionInterface,
    CLIPVisionConfig,
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

import csp_inductor
from csp_inductor import CSP, H2O, Full, SnapKV, compaction

IMAGE = 100
PATCHES = 16  # (32 / 8) ** 2 image tokens per image


def tiny_llava(seed: int = 0) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        image_size=32, patch_size=8, projection_dim=32,
    )  # fmt: skip
    text = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
    )  # fmt: skip
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=IMAGE,
        vision_feature_select_strategy="default", vision_feature_layer=-1,
    )  # fmt: skip
    return LlavaForConditionalGeneration(config).eval()


def prompt(texts: list[int], seed: int = 0) -> dict:
    """Text runs of the given lengths with one image between consecutive runs."""
    gen = torch.Generator().manual_seed(seed)
    parts = []
    for i, n in enumerate(texts):
        if i:
            parts.append(torch.full((PATCHES,), IMAGE))
        parts.append(torch.randint(1, 90, (n,), generator=gen))
    ids = torch.cat(parts)[None]
    pixels = torch.randn(len(texts) - 1, 3, 32, 32, generator=gen)
    return dict(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids))


def greedy(model, inputs, steps):
    out = model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
    return out[:, inputs["input_ids"].shape[1] :]


@pytest.fixture(scope="module")
def compiled_csp():
    """One compiled model shared by the tests that count graphs (first compile ≈ 20 s)."""
    model = csp_inductor.compile(tiny_llava(), CSP())
    yield model
    csp_inductor.restore(model)


def test_one_graph_no_recompiles_across_steps_and_prompt_lengths(compiled_csp):
    counters.clear()
    first = greedy(compiled_csp, prompt([20, 30, 40, 12], seed=1), steps=24)
    second = greedy(compiled_csp, prompt([35, 9, 50, 20, 7], seed=2), steps=21)
    assert first.shape[1] == 24 and second.shape[1] == 21
    assert dict(counters["graph_break"]) == {}
    # exactly three graphs for all of it: the decoder's prefill and decode step, the LM head
    assert counters["stats"]["unique_graphs"] == 3, dict(counters["stats"])
    assert compiled_csp.csp_backend.graphs == 2 and compiled_csp.csp_backend.lm_head.graphs == 1


def test_compiled_equals_eager_backend(compiled_csp):
    inputs = prompt([25, 14, 33], seed=3)
    compiled = greedy(compiled_csp, inputs, steps=10)
    eager = csp_inductor.compile(tiny_llava(), CSP(), compile=False)
    assert torch.equal(compiled, greedy(eager, inputs, steps=10))


def test_memory_is_really_saved(compiled_csp):
    inputs = prompt([100, 100, 100, 97], seed=4)  # 445 prompt tokens
    greedy(compiled_csp, inputs, steps=5)
    cache = compiled_csp.csp_backend.cache
    seq = inputs["input_ids"].shape[1]
    kept = CSP().budget_for(seq).kept
    assert cache.kept_prompt == [kept] and kept == 88  # 44 + 44 of 445 tokens (20%)
    per_token = cache.kv_bytes_per_token()
    assert per_token == 3 * 2 * 2 * 16 * 4  # layers x (K, V) x kv_heads x head_dim x fp32
    assert cache.nbytes() == (kept + 5) * per_token  # kept + decode capacity, nothing else
    full = seq * per_token
    print(f"KV bytes: pruned {cache.nbytes()} vs full prompt {full} ({cache.nbytes() / full:.1%})")


ORACLE = "csp_masked_oracle"


def masked_oracle(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Attention over the full cache with every pruned prompt position masked out, per layer
    and head: keep[layer] (batch, kv_heads, prompt_len) bool; decode tokens always visible."""
    keep = module.csp_oracle_keep
    b, hq, t, _ = query.shape
    hkv, total = key.shape[1], key.shape[2]
    allowed = torch.ones(b, hkv, total, dtype=torch.bool)
    allowed[:, :, : keep.shape[-1]] = keep
    allowed = allowed.repeat_interleave(hq // hkv, 1)[:, :, None, :]
    if t > 1:  # prefill: plain causal
        allowed = torch.ones(t, total, dtype=torch.bool).tril()[None, None]
    group = hq // hkv
    k, v = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    logits = (query @ k.transpose(-1, -2)) * scaling
    out = torch.softmax(logits.masked_fill(~allowed, -math.inf), -1) @ v
    return out.transpose(1, 2).contiguous(), None


COMPACTED = [
    CSP(), SnapKV(), H2O(budget=0.3), CSP(layers="pyramid"), SnapKV(layers="pyramid"),
    CSP(layers="adaptive"), CSP(query_window=4),
]  # fmt: skip


@pytest.mark.parametrize("policy", COMPACTED, ids=repr)
def test_compaction_equals_masking(policy):
    inputs = prompt([30, 25, 40, 10], seed=5)
    steps = 6
    model = csp_inductor.compile(tiny_llava(), policy, compile=False)
    cache = model.csp_backend.new_cache(decode_capacity=steps)
    ours, tokens = [], []
    out = model(**inputs, past_key_values=cache)
    mask = inputs["attention_mask"]
    for _ in range(steps):
        tok = out.logits[:, -1:].argmax(-1)
        tokens.append(tok)
        mask = torch.cat([mask, torch.ones_like(tok)], 1)
        out = model(input_ids=tok, attention_mask=mask, past_key_values=cache)
        ours.append(out.logits[:, -1])
    seq = inputs["input_ids"].shape[1]
    kept = [int(layer.lengths[0]) - steps for layer in cache.pruned]  # each layer's own
    if policy.layer_rule == "pyramid":
        assert len(set(kept)) == len(kept), kept
    assert sum(kept) == len(kept) * policy.budget_for(seq).kept
    csp_inductor.restore(model)
    # the oracle: full cache, unpruned prefill, pruned positions masked at decode
    AttentionInterface.register(ORACLE, masked_oracle)
    model.set_attn_implementation({"text_config": ORACLE})
    modules = _attention_modules(model)
    for layer, attn, held in zip(cache.layers, modules, kept, strict=True):
        pos = layer.positions[:, :, :held]
        attn.csp_oracle_keep = torch.zeros(1, pos.shape[1], seq, dtype=torch.bool).scatter_(
            2, pos, True
        )
        # positions are absolute: the kept prompt slots hold their original positions
        assert pos.min() >= 0 and pos.max() < seq
        decoded = layer.positions[:, :, held : held + steps]
        assert torch.equal(decoded[0, 0], torch.arange(seq, seq + steps))
    out = model(**inputs)
    cache_full = out.past_key_values
    mask = inputs["attention_mask"]
    for step, tok in enumerate(tokens):
        mask = torch.cat([mask, torch.ones_like(tok)], 1)
        out = model(input_ids=tok, attention_mask=mask, past_key_values=cache_full)
        torch.testing.assert_close(ours[step], out.logits[:, -1], atol=1e-5, rtol=1e-5)


def _left_padded(*prompts: dict) -> dict:
    """One batch of the prompts, left-padded to the longest."""
    longest = max(p["input_ids"].shape[1] for p in prompts)
    ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        n = p["input_ids"].shape[1]
        ids[row, longest - n :], mask[row, longest - n :] = p["input_ids"][0], 1
    pixels = torch.cat([p["pixel_values"] for p in prompts])
    return dict(input_ids=ids, pixel_values=pixels, attention_mask=mask)


LSE_PROMPTS = {
    "one": prompt([30, 25, 40, 10], seed=2),
    "padded": _left_padded(prompt([30, 25, 40, 10], seed=2), prompt([12, 20], seed=4)),
}


# the paper's window (as many queries as recent tokens) and a cap below it
WINDOWS = [CSP(query_window=0), CSP(query_window=4)]


@pytest.mark.parametrize("policy", WINDOWS, ids=repr)
@pytest.mark.parametrize("inputs", list(LSE_PROMPTS.values()), ids=list(LSE_PROMPTS))
def test_flex_prefill_with_and_without_the_attentions_lse(inputs, policy, monkeypatch):
    """The model keeps the same tokens and gives the same logits whether its scorer reuses
    FlexAttention's log-sum-exp (the default in plain causal layers) or computes its own."""
    model = csp_inductor.compile(tiny_llava(), policy, kernel="flex", compile=False)
    given = compaction._scores_from_lse
    used = []

    def spy(*args):
        scores = given(*args)
        used.append(scores is not None)
        return scores

    runs = []
    for reuse in (True, False):
        monkeypatch.setattr(compaction, "_scores_from_lse", spy if reuse else lambda *a: None)
        cache = model.csp_backend.new_cache(decode_capacity=1)
        with torch.no_grad():
            logits = model(**inputs, past_key_values=cache).logits
        runs.append((logits, [layer.positions.clone() for layer in cache.layers]))
    assert used == [True] * 3  # every layer scored from the attention's log-sum-exp
    (reused_logits, reused_pos), (logits, positions) = runs
    torch.testing.assert_close(reused_logits, logits, rtol=0, atol=0)
    for ours, theirs in zip(reused_pos, positions, strict=True):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("policy", WINDOWS, ids=repr)
@pytest.mark.parametrize("inputs", list(LSE_PROMPTS.values()), ids=list(LSE_PROMPTS))
def test_cpu_prefill_computes_the_window_rows_once(inputs, policy, monkeypatch):
    """On the CPU a window scorer's last rows are attended by the scoring pass itself: every
    layer goes through it, and the model keeps the tokens, and gives the logits, of the
    FlexAttention path, which attends to all rows in its kernel and scores from its LSE."""
    calls = []
    given = csp_inductor.scoring.window_attention_torch

    def spy(*args, **kwargs):
        calls.append(args[0].shape[2])
        return given(*args, **kwargs)

    monkeypatch.setattr(compaction, "window_attention_torch", spy)
    shared = csp_inductor.compile(tiny_llava(), policy, compile=False)
    flex = csp_inductor.compile(tiny_llava(), policy, kernel="flex", compile=False)
    runs = []
    for model in (shared, flex):
        cache = model.csp_backend.new_cache(decode_capacity=1)
        with torch.no_grad():
            logits = model(**inputs, past_key_values=cache).logits
        kept = max(cache.lengths.tolist())  # (flex rounds its buffers up to its block)
        runs.append((logits, [layer.positions[..., :kept].clone() for layer in cache.layers]))
    seq = inputs["input_ids"].shape[1]
    window = policy.scoring_window(seq, None).mask.shape[1]
    if policy.query_window:
        assert window == policy.query_window < policy.budget_for(seq).recent
    assert calls == [window] * 3
    (ours, our_positions), (theirs, their_positions) = runs
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    for mine, other in zip(our_positions, their_positions, strict=True):
        assert torch.equal(mine, other)


def _attention_modules(model):
    return [layer.self_attn for layer in model.model.language_model.layers]


def test_keep_all_is_exact_and_restore_undoes_everything():
    model = tiny_llava()
    inputs = prompt([30, 20, 11], seed=6)
    reference = greedy(model, inputs, steps=8)
    before = model.config.text_config._attn_implementation
    for policy in (Full(), CSP(budget=1.0)):
        csp_inductor.compile(model, policy, compile=False)
        assert torch.equal(greedy(model, inputs, steps=8), reference)
        csp_inductor.restore(model)
    assert model.config.text_config._attn_implementation == before
    assert not hasattr(model, "csp_backend")
    assert torch.equal(greedy(model, inputs, steps=8), reference)


def test_short_prompt_prunes_nothing():
    model = csp_inductor.compile(tiny_llava(), CSP(), compile=False)
    ids = torch.randint(1, 90, (1, 9))  # W = int(0.9) = 0 scoring queries: keep everything
    greedy(model, dict(input_ids=ids, attention_mask=torch.ones_like(ids)), steps=2)
    assert model.csp_backend.cache.kept_prompt == [9]


def test_text_only_prompt_warns_and_scores_text():
    model = csp_inductor.compile(tiny_llava(), CSP(), compile=False)
    ids = torch.randint(1, 90, (1, 120))
    with pytest.warns(UserWarning, match="no image tokens"):
        greedy(model, dict(input_ids=ids, attention_mask=torch.ones_like(ids)), steps=2)
    assert model.csp_backend.cache.kept_prompt == [24]


def test_plain_llm_with_a_text_policy():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 64, (1, 50))
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    reference = greedy(model, inputs, steps=6)
    csp_inductor.compile(model, Full(), compile=False)
    assert torch.equal(greedy(model, inputs, steps=6), reference)
    csp_inductor.restore(model)
    csp_inductor.compile(model, SnapKV(), compile=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        greedy(model, inputs, steps=6)
    assert model.csp_backend.cache.kept_prompt == [10]


def test_decode_softmax_n_option():
    inputs = prompt([30, 20, 11], seed=8)
    model = tiny_llava()
    logits = {}
    for n in (None, 1e-30, 1.0):
        csp_inductor.compile(model, CSP(), compile=False, decode_softmax_n=n)
        out = model.generate(
            **inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False,
            output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
        logits[n] = torch.stack(out.logits)
        assert model.csp_backend.cache.null_slot == (n is not None)
        csp_inductor.restore(model)
    # n -> 0 is the ordinary softmax; n = 1 really changes the decode distribution
    torch.testing.assert_close(logits[1e-30], logits[None])
    assert not torch.allclose(logits[1.0][1:], logits[None][1:], atol=1e-3)
    with pytest.raises(ValueError, match="decode_softmax_n must be"):
        csp_inductor.compile(model, decode_softmax_n=0.0)


@pytest.mark.parametrize("new_tokens", [1, 3])
def test_decode_write_op(new_tokens):
    """csp_inductor::write_decode_ (the in-place decode write compiled graphs call) writes each
    row's new K/V at its own length and their absolute positions, and nothing else."""
    gen = torch.Generator().manual_seed(0)
    b, h, cap, d, t = 2, 3, 12, 4, new_tokens
    keys, values = (
        torch.randn(b, h, cap, d, generator=gen),
        torch.randn(b, h, cap, 5, generator=gen),
    )
    positions = torch.randint(0, 50, (b, h, cap), generator=gen)
    new_k, new_v = torch.randn(b, h, t, d, generator=gen), torch.randn(b, h, t, 5, generator=gen)
    lengths, seen = torch.tensor([2, 7]), torch.tensor(40)
    args = (keys.clone(), values.clone(), positions.clone(), new_k, new_v, lengths, seen)
    torch.ops.csp_inductor.write_decode_(*args)
    for row, start in enumerate(lengths.tolist()):
        slots = slice(start, start + t)
        expected_k, expected_v, expected_p = (
            keys[row].clone(),
            values[row].clone(),
            positions[row].clone(),
        )
        expected_k[:, slots], expected_v[:, slots] = new_k[row], new_v[row]
        expected_p[:, slots] = torch.arange(40, 40 + t)
        assert torch.equal(args[0][row], expected_k) and torch.equal(args[1][row], expected_v)
        assert torch.equal(args[2][row], expected_p)
    torch.library.opcheck(torch.ops.csp_inductor.write_decode_.default, args)


def test_cache_grows_past_its_decode_capacity():
    inputs = prompt([30, 25, 10], seed=9)
    model = csp_inductor.compile(tiny_llava(), CSP(), compile=False)
    logits = []
    for capacity in (2, 16):
        cache = model.csp_backend.new_cache(decode_capacity=capacity)
        out = model(**inputs, past_key_values=cache)
        mask, steps = inputs["attention_mask"], []
        for _ in range(6):
            tok = out.logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(tok)], 1)
            out = model(input_ids=tok, attention_mask=mask, past_key_values=cache)
            steps.append(out.logits[:, -1])
        logits.append(torch.stack(steps))
        assert cache.room() >= 0 and cache.longest == cache.kept_prompt[0] + 6
    torch.testing.assert_close(logits[0], logits[1])


def test_flex_decode_steps_of_several_tokens():
    # assisted decoding verifies several draft tokens in one forward: a step of 3 tokens
    # between steps of 1 must attend as the unmodified model does (flex builds a mask per size)
    inputs = prompt([30, 25], seed=4)
    model = tiny_llava()
    steps = [torch.tensor([[5]]), torch.tensor([[6, 7, 8]]), torch.tensor([[9]])]

    def run(cache):
        out = model(**inputs, past_key_values=cache)
        mask, logits = inputs["attention_mask"], []
        for ids in steps:
            mask = torch.cat([mask, torch.ones_like(ids)], 1)
            out = model(input_ids=ids, attention_mask=mask, past_key_values=cache)
            logits.append(out.logits[0])
        return torch.cat(logits)

    with torch.no_grad():
        want = run(DynamicCache())
        csp_inductor.compile(model, Full(), compile=False, kernel="flex")
        got = run(model.csp_backend.new_cache(decode_capacity=8))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # outside generate a forward of several tokens is a conversation turn: its masks (which
    # hide its padding) are dropped after it; the one-token steps keep theirs
    assert {key[0] for key in model.csp_backend.block_masks} == {1}
