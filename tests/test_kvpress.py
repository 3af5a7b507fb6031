"""The kvpress bridge both ways (``csp_inductor.integrations.kvpress``), in an environment with
NVIDIA kvpress (``make test-compat``): CSP as a kvpress press, kvpress scorers as policies."""

import warnings

import pytest
import torch

kvpress = pytest.importorskip("kvpress")

from transformers import DynamicCache  # noqa: E402

import csp_inductor  # noqa: E402
from csp_inductor import CSP, KNorm, split_budget  # noqa: E402
from csp_inductor.budget import split_count  # noqa: E402
from csp_inductor.integrations.kvpress import CSPPress, FromKVPress  # noqa: E402
from csp_inductor.testing import (  # noqa: E402
    IMAGE_ID,
    TINY_VOCAB,
    assert_same_generation,
    greedy,
    random_prompt,
    tiny_inputs,
    tiny_model,
)

FAMILIES = ("llava", "qwen2_vl", "gemma3")


@pytest.fixture(autouse=True)
def _quiet_kvpress():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="CSP: a prompt has no image tokens")
        yield


def _kept_positions(full: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """(b, h, K) the positions of ``full``'s keys (b, h, L, d) that ``kept`` (b, h, K, d)
    holds, ascending (each kept key equals exactly one of the prompt's)."""
    same = (kept[:, :, :, None] == full[:, :, None]).all(dim=-1)  # (b, h, K, L)
    assert bool((same.sum(dim=-1) == 1).all()), "a kept key matches no prompt key, or several"
    return same.float().argmax(dim=-1).sort(dim=-1).values


def _prefill(model, inputs, press=None) -> DynamicCache:
    cache = DynamicCache()
    with torch.no_grad():
        if press is None:
            model(**inputs, past_key_values=cache)
        else:
            with press(model):
                model(**inputs, past_key_values=cache)
    return cache


# --- CSP as a kvpress press -------------------------------------------------------------------
def test_split_count_is_split_budget_when_the_counts_agree():
    for length in range(1, 400):
        ours = split_budget(length, 0.2, 0.1, 0.5)
        if ours.kept == int(length * 0.2):
            assert split_count(length, ours.kept, 0.1, 0.5) == ours


@pytest.mark.parametrize("layout", ["blocks", "mixed", "text"])
def test_press_policy_selects_as_csp(layout):
    """On a prompt where kvpress's count is CSP's (L = 100, keep 25%: 1 - 0.8 would keep 19,
    as kvpress truncates 100 * 0.19999999999999996), the press's selection is
    ``CSP.select``'s."""
    p = random_prompt(batch=2, q_heads=4, kv_heads=2, seq=100, layout=layout, seed=3)
    press = CSPPress(compression_ratio=0.75, window_ratio=0.1, cross_ratio=0.3, n=1.0)
    assert press.policy.budget_for(100).kept == 25
    want = CSP(budget=0.25, window_ratio=0.1, cross_ratio=0.3).select(p.q, p.k, p.is_image)
    got = press.policy.select(p.q, p.k, p.is_image)
    assert torch.equal(got, want)


@pytest.mark.parametrize("family", FAMILIES)
def test_press_keeps_what_the_backend_keeps(family):
    """kvpress with CSPPress keeps, in every layer it prunes, the positions the backend keeps
    with the same policy: the captured window queries, modality and scale are the model's."""
    model = tiny_model(family)
    inputs = tiny_inputs(model, family)
    full = _prefill(model, inputs)
    press = CSPPress(compression_ratio=0.75, window_ratio=0.1)
    pruned = _prefill(model, inputs, press)
    csp_inductor.compile(model, press.policy, compile=False)
    try:
        with torch.no_grad():
            model(**inputs)
        ours = model.csp_backend.cache
        length = inputs["input_ids"].shape[1]
        kept = press.policy.budget_for(length).kept
        checked = 0
        for i, (a, b) in enumerate(zip(full.layers, pruned.layers, strict=True)):
            if b.keys.shape[2] == length:  # a layer kvpress does not prune (Gemma 3's sliding)
                continue
            assert b.keys.shape[2] == kept
            positions = ours.layers[i].positions[:, :, :kept]
            assert torch.equal(_kept_positions(a.keys, b.keys), positions), f"layer {i}"
            checked += 1
        assert checked >= 1
    finally:
        csp_inductor.restore(model)


def test_press_generates_as_the_backend():
    model = tiny_model("llava")
    inputs = tiny_inputs(model, "llava")
    press = CSPPress(compression_ratio=0.75)
    with press(model):
        got = greedy(model, inputs, 8)
    csp_inductor.compile(model, press.policy, compile=False)
    try:
        want = greedy(model, inputs, 8)
    finally:
        csp_inductor.restore(model)
    assert_same_generation(got, want)


def test_press_leaves_the_model_as_it_was():
    model = tiny_model("qwen2_vl")
    inputs = tiny_inputs(model, "qwen2_vl")
    before = _prefill(model, inputs)
    _prefill(model, inputs, CSPPress(compression_ratio=0.5))
    assert model.config.get_text_config()._attn_implementation == "sdpa"
    attn = model.model.language_model.layers[0].self_attn
    assert not [k for k in vars(attn) if k.startswith("csp_")]
    assert not model.model._forward_pre_hooks and not attn._forward_hooks
    after = _prefill(model, inputs)
    assert torch.equal(before.layers[0].keys, after.layers[0].keys)


def test_press_keeps_kvpress_count_when_it_falls_short_of_the_window():
    """kvpress keeps int(100 * 0.09999999999999998) = 9 tokens at compression_ratio=0.9, one
    fewer than the 10-token window: the window is cut to the count."""
    model = tiny_model("llama")
    inputs = {
        "input_ids": torch.randint(3, 90, (1, 100), generator=torch.Generator().manual_seed(0))
    }
    pruned = _prefill(model, inputs, CSPPress(compression_ratio=0.9, window_ratio=0.1))
    assert pruned.layers[0].keys.shape[2] == kvpress.utils.compute_n_kept(100, 0.9) == 9
    full = _prefill(model, inputs)
    assert torch.equal(pruned.layers[0].keys, full.layers[0].keys[:, :, -9:])


def test_press_on_a_short_prompt_keeps_the_latest():
    """A prompt too short for a scoring query (int(L * window_ratio) = 0): kvpress still keeps
    its count, the most recent tokens."""
    model = tiny_model("llama")
    inputs = {"input_ids": torch.arange(3, 12)[None]}
    full = _prefill(model, inputs)
    pruned = _prefill(model, inputs, CSPPress(compression_ratio=0.5, window_ratio=0.1))
    assert torch.equal(pruned.layers[0].keys, full.layers[0].keys[:, :, -4:])


def test_press_in_a_kvpress_pipeline():
    """kvpress's own pipeline (context pruned, then the question) runs CSP on a tiny VLM."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, pipeline

    vocab = {f"w{i}": i for i in range(TINY_VOCAB)} | {"<image>": IMAGE_ID}
    del vocab[f"w{IMAGE_ID}"]
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w3"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="w1", eos_token="w2")
    model = tiny_model("llava")
    context = " ".join([f"w{5 + i % 80}" for i in range(40)] + ["<image>"] * 60 + ["w9"] * 10)
    pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer, device="cpu")
    cache = DynamicCache()
    press = CSPPress(compression_ratio=0.8)
    out = pipe(context, question="w7 w8", press=press, cache=cache, max_new_tokens=4)
    assert isinstance(out["answer"], str) and out["answer"]
    length = 1 + 110  # the bos token and the context
    assert cache.layers[0].keys.shape[2] < length
    assert cache.layers[0].keys.shape[2] >= press.policy.budget_for(length).kept


def test_press_refusals():
    model = tiny_model("llava")
    inputs = tiny_inputs(model, "llava", batch=2, pads=[0, 4])
    with pytest.raises(ValueError, match="padded prompts"):
        _prefill(model, inputs, CSPPress(compression_ratio=0.5))
    embeds = {"inputs_embeds": model.get_input_embeddings()(inputs["input_ids"][:1, 4:])}
    with pytest.raises(ValueError, match="inputs_embeds only"):
        _prefill(model, embeds, CSPPress(compression_ratio=0.5))
    with pytest.raises(ValueError, match=r"window_ratio must be a number in \(0.0, 0.2\]"):
        CSPPress(compression_ratio=0.8, window_ratio=0.3)
    with pytest.raises(ValueError, match="compression_ratio must be below 1"):
        CSPPress(compression_ratio=1.0)
    csp_inductor.compile(model, compile=False)
    try:
        with pytest.raises(TypeError, match="runs csp_inductor's backend"), CSPPress()(model):
            pass
    finally:
        csp_inductor.restore(model)


# --- kvpress scorers inside the backend -------------------------------------------------------
def _positions(model) -> list[torch.Tensor]:
    cache = model.csp_backend.cache
    return [layer.positions.clone() for layer in cache.pruned]


def test_knorm_press_keeps_what_knorm_keeps():
    model = tiny_model("llava")
    inputs = tiny_inputs(model, "llava")
    runs = []
    for policy in (KNorm(0.2), FromKVPress(kvpress.KnormPress(), budget=0.2)):
        csp_inductor.compile(model, policy, compile=False)
        try:
            runs.append((greedy(model, inputs, 6), _positions(model)))
        finally:
            csp_inductor.restore(model)
    (want, want_pos), (got, got_pos) = runs
    assert_same_generation(got, want)
    for a, b in zip(got_pos, want_pos, strict=True):
        assert torch.equal(a, b)


def _captured_scores(model, press, inputs) -> dict[int, torch.Tensor]:
    """What ``press.score`` gives each layer under kvpress itself (unpruned prefill)."""
    seen = {}
    original = press.score

    def score(module, *args):
        seen[module.layer_idx] = original(module, *args)
        return seen[module.layer_idx]

    press.score = score
    try:
        _prefill(model, inputs, press)
    finally:
        del press.score
    return seen


def test_snapkv_press_scores_reach_the_selection():
    """The backend ranks by exactly the scores kvpress's hook computes for the same prompt."""
    model = tiny_model("llava")
    inputs = tiny_inputs(model, "llava")
    press = kvpress.SnapKVPress(compression_ratio=0.5, window_size=8)
    want = _captured_scores(model, press, inputs)
    policy = FromKVPress(press, budget=0.3, window_ratio=0.1)
    got = {}
    original = policy.layer_scores

    def layer_scores(module, *args):
        got[module.layer_idx] = original(module, *args)
        return got[module.layer_idx]

    object.__setattr__(policy, "layer_scores", layer_scores)
    csp_inductor.compile(model, policy, compile=False)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        csp_inductor.restore(model)
    assert sorted(got) == sorted(want)
    for i in want:
        torch.testing.assert_close(got[i], want[i].float(), atol=1e-6, rtol=1e-5)


@pytest.fixture(scope="module")
def compiled_snapkv():
    model = tiny_model("llava")
    policy = FromKVPress(kvpress.SnapKVPress(window_size=8), budget=0.2)
    csp_inductor.compile(model, policy)
    yield model
    csp_inductor.restore(model)


def test_compiled_press_policy_matches_eager_and_does_not_recompile(compiled_snapkv):
    model = compiled_snapkv
    backend = model.csp_backend
    first = greedy(model, tiny_inputs(model, "llava", seed=0), 6)
    graphs = backend.graphs
    assert graphs >= 1 and backend.fallback is None
    second = greedy(model, tiny_inputs(model, "llava", seed=1), 6)
    assert backend.graphs == graphs and backend.fallback is None
    policy = backend.policy
    backend.policy = FromKVPress(kvpress.KnormPress(), budget=0.2)  # another press: no graph
    greedy(model, tiny_inputs(model, "llava", seed=2), 6)
    assert backend.graphs == graphs and backend.fallback is None
    backend.policy = policy
    eager = tiny_model("llava")
    csp_inductor.compile(eager, policy, compile=False)
    for seed, got in ((0, first), (1, second)):
        assert_same_generation(got, greedy(eager, tiny_inputs(eager, "llava", seed=seed), 6))


@pytest.mark.parametrize(
    "make",
    [
        lambda: kvpress.ExpectedAttentionPress(),
        lambda: kvpress.TOVAPress(),
        lambda: kvpress.StreamingLLMPress(),
        lambda: kvpress.KeyDiffPress(),
        lambda: kvpress.RandomPress(seed=0),
    ],
    ids=["expected_attention", "tova", "streamingllm", "keydiff", "random"],
)
def test_more_presses_run_in_the_backend(make):
    model = tiny_model("llava")
    inputs = tiny_inputs(model, "llava")
    csp_inductor.compile(model, FromKVPress(make(), budget=0.25), compile=False)
    try:
        tokens, _ = greedy(model, inputs, 3)
        length = inputs["input_ids"].shape[1]
        kept = model.csp_backend.policy.budget_for(length).kept
        assert tokens.shape == (1, 3)
        assert int(model.csp_backend.cache.lengths[0]) == kept + 2
    finally:
        csp_inductor.restore(model)


def test_press_policy_takes_its_count_from_the_budget():
    press = kvpress.StreamingLLMPress(compression_ratio=0.0, n_sink=4)
    policy = FromKVPress(press, budget=0.2)
    assert policy.press.compression_ratio == 0.8 and press.compression_ratio == 0.0
    assert policy == policy and policy != FromKVPress(press, budget=0.2)  # itself only


def test_unpadded_batches_are_scored_and_turns_kept_whole():
    """Rows of equal length are scored together; a conversation's next turn is kept whole,
    as kvpress keeps it (its scorers are prompt scorers)."""
    model = tiny_model("llava")
    inputs = tiny_inputs(model, "llava", batch=2)
    policy = FromKVPress(kvpress.KnormPress(), budget=0.2)
    csp_inductor.compile(model, policy, compile=False)
    try:
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=3, return_dict_in_generate=True)
        cache = model.csp_backend.cache
        length = inputs["input_ids"].shape[1]
        assert cache.rows == [policy.budget_for(length).kept + 2] * 2
        turn = torch.randint(3, 90, (2, 30), generator=torch.Generator().manual_seed(1))
        ids = torch.cat([out.sequences, turn], dim=1)
        with torch.no_grad():
            model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2,
                past_key_values=cache,
            )  # fmt: skip
        assert cache.rows == [policy.budget_for(length).kept + 3 + 30 + 1] * 2
    finally:
        csp_inductor.restore(model)


def test_a_failed_scoring_leaves_nothing_behind():
    """A press that raises inside the forward (SnapKV's window exceeds the prompt) leaves no
    hook, rotary embedding or collected input once the model is restored."""
    model = tiny_model("llava")
    csp_inductor.compile(model, FromKVPress(kvpress.SnapKVPress(window_size=500)), compile=False)
    backend = model.csp_backend
    with pytest.raises(AssertionError):
        greedy(model, tiny_inputs(model, "llava"), 2)
    csp_inductor.restore(model)
    for layer in model.model.language_model.layers:
        assert not layer.self_attn._forward_pre_hooks
        assert not hasattr(layer.self_attn, "rotary_emb")
    assert not backend.layer_inputs


def test_press_policy_refusals():
    with pytest.raises(TypeError, match="not one"):
        FromKVPress(KNorm(0.2))
    with pytest.raises(TypeError, match="ObservedAttentionPress"):
        FromKVPress(kvpress.ObservedAttentionPress())

    class OwnCounts(kvpress.SnapKVPress):  # (kvpress's own such presses: PyramidKVPress)
        def compress(self, *args, **kwargs):
            return super().compress(*args, **kwargs)

    with pytest.raises(TypeError, match="overrides compress"):
        FromKVPress(OwnCounts())
    with pytest.raises(ValueError, match="PyramidKVPress shares its budget by the pyramid"):
        FromKVPress(kvpress.PyramidKVPress(), layers="uniform")
    with pytest.raises(TypeError, match="not one"):
        FromKVPress(kvpress.KVzipPress())
    with pytest.raises(TypeError, match="not one"):
        FromKVPress(kvpress.AdaKVPress(kvpress.SnapKVPress()))
    with pytest.raises(ValueError, match="window_ratio"):
        FromKVPress(kvpress.KnormPress(), budget=0.1, window_ratio=0.2)
    model = tiny_model("llava")
    with pytest.raises(ValueError, match="max_cache_tokens re-prunes"):
        csp_inductor.compile(
            model, FromKVPress(kvpress.KnormPress()), compile=False, max_cache_tokens=64
        )
    csp_inductor.compile(model, FromKVPress(kvpress.KnormPress()), compile=False)
    try:
        with pytest.raises(ValueError, match="rows of equal length"):
            greedy(model, tiny_inputs(model, "llava", batch=2, pads=[0, 3]), 2)
    finally:
        csp_inductor.restore(model)


def test_gemma3_global_and_sliding_layers_are_scored_by_the_press():
    """Unlike kvpress (global layers only), the backend prunes Gemma 3's sliding layers too;
    a press calling the layer's rotary embedding (layer-typed there) is refused by name."""
    model = tiny_model("gemma3")
    inputs = tiny_inputs(model, "gemma3")
    csp_inductor.compile(model, FromKVPress(kvpress.KnormPress(), budget=0.25), compile=False)
    try:
        greedy(model, inputs, 2)
        length = inputs["input_ids"].shape[1]
        kept = model.csp_backend.policy.budget_for(length).kept
        layers = model.csp_backend.cache.pruned
        assert [int((layer.positions[0, 0] >= 0).sum()) for layer in layers] == [kept + 1] * 3
        model.csp_backend.policy = FromKVPress(kvpress.ExpectedAttentionPress(), budget=0.25)
        with pytest.raises(ValueError, match="calls the attention layer's rotary_emb"):
            greedy(model, inputs, 2)
    finally:
        csp_inductor.restore(model)


def test_query_presses_are_refused_on_multi_axis_rope():
    model = tiny_model("qwen2_vl")
    inputs = tiny_inputs(model, "qwen2_vl")
    csp_inductor.compile(model, FromKVPress(kvpress.SnapKVPress(window_size=8)), compile=False)
    try:
        with pytest.raises(ValueError, match="M-RoPE"):
            greedy(model, inputs, 2)
        model.csp_backend.policy = FromKVPress(kvpress.KnormPress())
        tokens, _ = greedy(model, inputs, 2)
        assert tokens.shape == (1, 2)
    finally:
        csp_inductor.restore(model)


def test_pyramid_press_keeps_its_count_in_each_layer_and_holds_only_that():
    """A PyramidKVPress: its SnapKV scores, the budget shared by the pyramid rule at its beta,
    each layer's cache holding its own count; the layers together the uniform total."""
    model = tiny_model("llava")
    inputs = tiny_inputs(model, "llava")
    press = kvpress.PyramidKVPress(window_size=8, beta=4)
    policy = FromKVPress(press, budget=0.3)
    assert policy.layers == "pyramid" and policy.layer_weights(2) == [1.75, 0.25]
    csp_inductor.compile(model, policy, compile=False)
    try:
        tokens, _ = greedy(model, inputs, 3)
        assert tokens.shape == (1, 3)
        cache = model.csp_backend.cache
        length = inputs["input_ids"].shape[1]
        layers = len(cache.pruned)
        counts = policy.layer_counts(length, layers)
        assert [int(layer.lengths[0]) for layer in cache.pruned] == [n + 2 for n in counts]
        assert counts == sorted(counts, reverse=True) and counts[0] > counts[-1]
        assert sum(counts) == layers * policy.budget_for(length).kept
        per_layer = cache.kv_bytes_per_token() // layers
        assert cache.nbytes() == sum(layer.keys.shape[2] for layer in cache.pruned) * per_layer
        assert cache.nbytes() < layers * (length + 2) * per_layer
    finally:
        csp_inductor.restore(model)
