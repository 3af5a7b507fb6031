"""Streaming prefill (``prefill_chunk``): a prompt through the decoder a chunk at a time, the
cache pruned as it arrives (or capped by ``max_cache_tokens``)."""

import pytest
import torch

import csp_inductor
from csp_inductor import CSP, Full, KVzip, SnapKV
from csp_inductor.backend.stream import chunk_spans
from csp_inductor.policy_table import register_policy
from csp_inductor.testing import (
    TEXT_IDS,
    assert_same_generation,
    greedy,
    tiny_inputs,
    tiny_model,
)

CHUNK = 32
NEW_TOKENS = 5


def text_inputs(length: int, seed: int = 0) -> dict:
    ids = torch.randint(*TEXT_IDS, (1, length), generator=torch.Generator().manual_seed(seed))
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids))


def case_inputs(case: str, model) -> dict:
    """``llava``/``qwen2_vl``: text and two images; ``llava_batch``: two rows, the second
    left-padded by 7; ``gemma3_text``: text only (its images attend bidirectionally, refused
    below), through its sliding-window layers (window 24 < the prompt)."""
    if case == "gemma3_text":
        return text_inputs(90)
    if case == "llava_batch":
        return tiny_inputs(model, "llava", batch=2, pads=[0, 7])
    return tiny_inputs(model, case)


FAMILY = {"llava": "llava", "llava_batch": "llava", "qwen2_vl": "qwen2_vl", "gemma3_text": "gemma3"}
CASES = list(FAMILY)


@pytest.fixture(scope="module")
def unmodified():
    return {family: tiny_model(family) for family in set(FAMILY.values())}


@pytest.fixture(scope="module")
def compiled_full():
    """A compiled keep-all streaming model per family, shared (each compiles once)."""
    models = {}
    for family in set(FAMILY.values()):
        models[family] = csp_inductor.compile(tiny_model(family), Full(), prefill_chunk=CHUNK)
    return models


@pytest.mark.parametrize("case", CASES)
def test_streaming_with_a_keep_all_policy_gives_the_unmodified_models_tokens(
    case, unmodified, compiled_full, one_thread
):
    family = FAMILY[case]
    inputs = case_inputs(case, unmodified[family])
    assert inputs["input_ids"].shape[1] > 2 * CHUNK  # three chunks at least
    want = greedy(unmodified[family], inputs, NEW_TOKENS)
    assert_same_generation(greedy(compiled_full[family], inputs, NEW_TOKENS), want)
    eager = csp_inductor.compile(tiny_model(family), Full(), prefill_chunk=CHUNK, compile=False)
    assert_same_generation(greedy(eager, inputs, NEW_TOKENS), want)
    cache = eager.csp_backend.cache
    real = inputs["attention_mask"].sum(dim=1).tolist()
    assert cache.rows == [n + NEW_TOKENS - 1 for n in real]


@pytest.mark.parametrize("case", CASES)
def test_a_bound_above_the_prompt_prunes_nothing_of_a_stream(case, unmodified, one_thread):
    # Under max_cache_tokens a stream's chunks are kept whole until the cache is full: a
    # bound that holds the prompt and its answer never re-prunes, whatever the policy.
    family = FAMILY[case]
    inputs = case_inputs(case, unmodified[family])
    want = greedy(unmodified[family], inputs, NEW_TOKENS)
    bound = inputs["input_ids"].shape[1] + NEW_TOKENS
    model = csp_inductor.compile(
        tiny_model(family), CSP(budget=0.3), prefill_chunk=CHUNK, max_cache_tokens=bound,
        compile=False,
    )  # fmt: skip
    assert_same_generation(greedy(model, inputs, NEW_TOKENS), want)
    assert model.csp_backend.cache.reprunes == 0


def test_a_second_prompt_length_streams_without_a_new_graph(compiled_full, one_thread):
    model = compiled_full["llava"]
    before = model.csp_backend.graphs
    assert before > 0
    inputs = tiny_inputs(model, "llava", seed=3)
    longer = {k: v for k, v in inputs.items() if k != "pixel_values"}
    extra = torch.randint(*TEXT_IDS, (1, 21), generator=torch.Generator().manual_seed(1))
    longer["input_ids"] = torch.cat([extra, inputs["input_ids"]], dim=1)
    longer["attention_mask"] = torch.ones_like(longer["input_ids"])
    longer["pixel_values"] = inputs["pixel_values"]
    greedy(model, longer, NEW_TOKENS)
    assert model.csp_backend.graphs == before
    assert model.csp_backend.fallback is None


def test_a_plain_forward_returns_every_positions_logits(unmodified, one_thread):
    inputs = tiny_inputs(unmodified["llava"], "llava")
    model = csp_inductor.compile(tiny_model("llava"), Full(), prefill_chunk=CHUNK, compile=False)
    with torch.no_grad():
        want = unmodified["llava"](**inputs).logits
        got = model(**inputs).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_streaming_prunes_each_chunk_by_the_policys_budget(unmodified, one_thread):
    # Without a bound each chunk keeps the policy's budget of its own tokens: the cache holds
    # the budget of the tokens seen, never the whole prompt.
    policy = CSP(budget=0.3)
    inputs = text_inputs(150)
    model = csp_inductor.compile(tiny_model("llava"), policy, prefill_chunk=CHUNK, compile=False)
    greedy(model, inputs, 1)
    cache = model.csp_backend.cache
    chunks = [hi - lo for lo, hi in chunk_spans(150, CHUNK, None)]
    assert cache.rows == [sum(policy.budget_for(n).kept for n in chunks)]
    assert cache.turns == [([150], cache.rows)]  # one prompt, as the cache reports it
    # the buffers, grown ahead of the chunks, are given back: the kept tokens and the answer's
    assert cache.nbytes() == (cache.rows[0] + 1) * cache.kv_bytes_per_token()


def test_a_bounded_stream_never_holds_more_than_the_bound(unmodified, one_thread):
    bound, policy = 80, SnapKV(budget=0.25)
    inputs = text_inputs(300)
    model = csp_inductor.compile(
        tiny_model("llava"), policy, prefill_chunk=CHUNK, max_cache_tokens=bound, compile=False
    )
    greedy(model, inputs, NEW_TOKENS)
    cache = model.csp_backend.cache
    assert cache.reprunes >= 300 // bound
    assert max(cache.rows) <= bound
    assert all(layer.keys.shape[2] <= bound for layer in cache.pruned)  # never allocated more


def test_a_question_agnostic_policy_streams(unmodified, one_thread):
    # Every chunk is re-read (attending to what the cache holds before it) and the policy keeps
    # its budget of all the tokens seen, ranked by the scores they carry: as many as one-shot.
    policy = KVzip(budget=0.3, window_ratio=0.05)
    inputs = text_inputs(200)
    model = csp_inductor.compile(tiny_model("llava"), policy, prefill_chunk=64, compile=False)
    greedy(model, inputs, 1)
    assert model.csp_backend.cache.rows == [policy.budget_for(200).kept]


def test_a_chunk_that_raises_leaves_the_cache_empty(unmodified, one_thread):
    inputs = tiny_inputs(unmodified["llava"], "llava")
    model = csp_inductor.compile(
        tiny_model("llava"), CSP(budget=0.3), prefill_chunk=CHUNK, compile=False
    )
    backend = model.csp_backend
    streamed = model.model.language_model.forward
    forward, calls = streamed.forward, []

    def third_chunk_fails(**kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("chunk failed")
        return forward(**kwargs)

    cache = backend.new_cache()
    streamed.forward = third_chunk_fails
    with pytest.raises(RuntimeError, match="chunk failed"), torch.no_grad():
        model(**inputs, past_key_values=cache)
    assert cache.phase == "empty" and cache.nbytes() == 0 and int(cache.seen) == 0
    streamed.forward = forward
    with torch.no_grad():
        model(**inputs, past_key_values=cache)  # the same cache takes the prompt again
    fresh = csp_inductor.compile(
        tiny_model("llava"), CSP(budget=0.3), prefill_chunk=CHUNK, compile=False
    )
    assert_same_generation(greedy(model, inputs, 3), greedy(fresh, inputs, 3))
    assert cache.rows == fresh.csp_backend.cache.kept_prompt


def test_images_attending_bidirectionally_are_refused(unmodified, one_thread):
    inputs = tiny_inputs(unmodified["gemma3"], "gemma3")
    model = csp_inductor.compile(tiny_model("gemma3"), Full(), prefill_chunk=CHUNK, compile=False)
    with pytest.raises(ValueError, match="prefill_chunk streams a prompt with causal attention"):
        greedy(model, inputs, 1)
    assert model.csp_backend.cache.phase == "empty"


def test_outputs_over_the_whole_prompt_are_refused(one_thread):
    model = csp_inductor.compile(tiny_model("llava"), Full(), prefill_chunk=CHUNK, compile=False)
    with pytest.raises(ValueError, match="output_hidden_states=True"), torch.no_grad():
        model(**text_inputs(80), output_hidden_states=True)


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(prefill_chunk=0), "prefill_chunk must be None .* an int >= 1, got prefill_chunk=0"),
        (dict(prefill_chunk=1.5), "got prefill_chunk=1.5"),
        (dict(prefill_chunk=True), "got prefill_chunk=True"),
        (dict(max_cache_tokens=True), "got max_cache_tokens=True"),
        (
            dict(prefill_chunk=64, max_cache_tokens=64),
            "prefill_chunk must be below max_cache_tokens.* prefill_chunk=64 with max_cache",
        ),
        (
            dict(prefill_chunk=40, max_cache_tokens=64),
            r"prefill_chunk=40 does not fit under max_cache_tokens=64 beside the \d+ tokens",
        ),
    ],
)
def test_bad_chunk_options_are_refused(options, match):
    with pytest.raises(ValueError, match=match):
        csp_inductor.compile(tiny_model("llava"), CSP(budget=0.5), compile=False, **options)


def test_a_policy_that_leaves_no_room_for_a_chunk_is_refused_when_set():
    model = csp_inductor.compile(
        tiny_model("llava"), CSP(budget=0.2), prefill_chunk=40, max_cache_tokens=64,
        compile=False,
    )  # fmt: skip
    with pytest.raises(ValueError, match="prefill_chunk=40 does not fit"):
        model.csp_backend.policy = CSP(budget=0.5)


def test_chunk_spans_give_the_first_chunk_a_real_token_of_every_row():
    assert chunk_spans(100, 32, None) == [(0, 32), (32, 64), (64, 96), (96, 100)]
    mask = torch.ones(2, 100, dtype=torch.long)
    mask[1, :40] = 0  # 40 tokens of left padding: the first chunk takes 41
    assert chunk_spans(100, 32, mask) == [(0, 41), (41, 73), (73, 100)]


def test_a_llava_streams_from_its_inputs_one_chunks_images_at_a_time(unmodified, one_thread):
    # The vision tower encodes each chunk's images only, inside generate too (which would
    # otherwise encode every image before the forward), and chunks end between images.
    inputs = tiny_inputs(unmodified["llava"], "llava")
    model = csp_inductor.compile(tiny_model("llava"), Full(), prefill_chunk=CHUNK, compile=False)
    encoded = []
    tower = model.model.vision_tower
    hook = tower.register_forward_pre_hook(lambda module, args: encoded.append(len(args[0])))
    want = greedy(unmodified["llava"], inputs, NEW_TOKENS)
    assert_same_generation(greedy(model, inputs, NEW_TOKENS), want)
    hook.remove()
    assert encoded == [1, 1]  # two images, in two chunks
    seen = [real for real, _ in model.csp_backend.cache.turns]
    assert seen == [[inputs["input_ids"].shape[1]]]


def test_chunks_end_between_images():
    allowed = torch.ones(101, dtype=torch.bool)
    allowed[31:47] = False  # an image at [30, 46]: no chunk ends inside it
    assert chunk_spans(100, 32, None, allowed) == [(0, 30), (30, 62), (62, 94), (94, 100)]
    allowed[31:80] = False  # an image longer than a chunk: its chunk is longer
    assert chunk_spans(100, 32, None, allowed) == [(0, 30), (30, 80), (80, 100)]


def test_a_reprune_keeps_its_budget_of_the_dropped_tokens_too():
    # What a streamed prompt's re-read does: the held tokens are ranked after ``dropped``
    # tokens pruned before, which score lowest: the same as ranking a buffer that holds such
    # tokens in front of them, and the policy keeps its budget of them all.
    policy = KVzip(budget=0.4, window_ratio=0.1)
    index = torch.tensor(register_policy(policy))
    gen = torch.Generator().manual_seed(5)
    heads, capacity, dim, held, dropped = 2, 40, 8, 30, 20
    keys = torch.randn(1, heads, capacity, dim, generator=gen)
    positions = (torch.arange(capacity) + dropped).expand(1, heads, -1).clone()
    images = torch.rand(1, heads, capacity, generator=gen) < 0.3
    scores = torch.rand(1, heads, 2, capacity, generator=gen)
    kept = torch.tensor([policy.budget_for(held + dropped).kept])
    assert kept < held
    got = [t.clone() for t in (keys, keys, positions, images)]
    torch.ops.csp_inductor.reprune_(
        *got, None, None, None, torch.tensor([held]), kept, index, dim**-0.5, scores,
        torch.tensor([dropped]),
    )  # fmt: skip
    front = [
        torch.cat([torch.zeros_like(t[:, :, :dropped]), t], dim=2)
        for t in (keys, keys, positions, images)
    ]
    lowest = torch.full((1, heads, 2, dropped), torch.finfo(scores.dtype).min)
    want = [t.clone() for t in front]
    torch.ops.csp_inductor.reprune_(
        *want, None, None, None, torch.tensor([held + dropped]), kept, index, dim**-0.5,
        torch.cat([lowest, scores], dim=3),
    )  # fmt: skip
    n = int(kept)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a[:, :, :n], b[:, :, :n])
    assert not got[3][:, :, n:].any()


def test_a_question_agnostic_policy_streams_a_padded_batch(unmodified, one_thread):
    # A first chunk kept whole (12 and 19 real tokens: no recent token at a 5% window) still
    # stores its slots' modality, which the later chunks' re-reads read.
    inputs = tiny_inputs(unmodified["llava"], "llava", batch=2, pads=[20, 13])
    policy = KVzip(budget=0.3, window_ratio=0.05)  # (a chunk of 32 keeps a recent token)
    model = csp_inductor.compile(tiny_model("llava"), policy, prefill_chunk=CHUNK,
                                 compile=False)  # fmt: skip
    greedy(model, inputs, 2)
    cache = model.csp_backend.cache
    real = inputs["attention_mask"].sum(dim=1).tolist()
    assert all(0 < held < n / 2 for held, n in zip(cache.rows, real, strict=True))


def test_a_streamed_prompts_end_is_kept_as_a_whole_prompts_recent_tokens(one_thread):
    # The last chunk (where the question is) keeps the whole prompt's recent tokens, here 15
    # of 300, where a 100-token chunk alone would keep its last 5.
    policy = KVzip(budget=0.3, window_ratio=0.05)
    model = csp_inductor.compile(tiny_model("llava"), policy, prefill_chunk=100, compile=False)
    greedy(model, text_inputs(300), 1)
    recent = policy.budget_for(300).recent
    assert recent == 15 and policy.budget_for(100).recent == 5
    for layer in model.csp_backend.cache.pruned:
        held = layer.positions[0]  # (heads, slots)
        for position in range(300 - recent, 300):
            assert (held == position).any(dim=1).all()
