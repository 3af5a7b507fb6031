"""A bounded cache (``max_cache_tokens``): re-pruned with the policy when generation fills it."""

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import LogitsProcessorList

import csp_inductor
from csp_inductor import CSP, H2O, Full, SnapKV, StreamingLLM
from csp_inductor.policy_table import register_policy
from csp_inductor.testing import IMAGE_ID, random_prompt, tiny_inputs, tiny_model


@pytest.mark.parametrize("policy", [CSP(), CSP(n=0.0, cross_ratio=0.3), SnapKV(), StreamingLLM()])
def test_reprune_ranks_the_held_tokens_as_the_policy_ranks_a_prompt(policy):
    # A cache holding every token of a prompt in order, with the last W queries remembered,
    # keeps what the policy keeps of that prompt; row 1 holds 7 tokens fewer (a prompt
    # left-padded by 7), its slots after them unused.
    seq, pad, extra = 80, 7, 5
    p = random_prompt(2, 4, 2, seq, 8, seed=11, pads=[0, pad])
    lengths = torch.tensor([seq, seq - pad])
    keys = torch.zeros(2, 2, seq + extra, 8)
    positions = torch.full((2, 2, seq + extra), -1)
    images = torch.zeros(2, 2, seq + extra, dtype=torch.bool)
    for row, length in enumerate(lengths.tolist()):  # row 1's tokens slid to the front
        keys[row, :, :length] = p.k[row, :, seq - length :]
        positions[row, :, :length] = torch.arange(length)
        images[row, :, :length] = p.is_image[row, seq - length :]
    window = policy.budget_for(seq).window
    queries, ring, ring_images = None, None, None
    if policy.window_n is not None:
        queries = torch.zeros(2, 4, window, 8)
        ring = torch.full((2, window), -1)
        ring_images = torch.zeros(2, window, dtype=torch.bool)
        for row, length in enumerate(lengths.tolist()):
            for pos in range(length - window, length):
                queries[row, :, pos % window] = p.q[row, :, seq - length + pos]
                ring[row, pos % window] = pos
                ring_images[row, pos % window] = p.is_image[row, seq - length + pos]
    kept = torch.tensor([policy.budget_for(n).kept for n in lengths.tolist()])
    values = keys.clone()
    torch.ops.csp_inductor.reprune_(
        keys, values, positions, images, queries, ring, ring_images, lengths, kept,
        torch.tensor(register_policy(policy)), 8**-0.5,
    )  # fmt: skip
    want = policy.select(p.q, p.k, p.is_image, p.key_padding)
    for row, length in enumerate(lengths.tolist()):
        n = int(kept[row])
        expected = want[row, :, :n] - (seq - length)  # positions in the row's own count
        assert torch.equal(positions[row, :, :n], expected)
        original = p.k[row].gather(1, want[row, :, :n, None].expand(-1, -1, 8))
        assert torch.equal(keys[row, :, :n], original) and torch.equal(values[row, :, :n], original)
        assert torch.equal(images[row, :, :n], p.is_image[row][want[row, :, :n]])
        assert not images[row, :, n:].any()


class CacheLog:
    """A logits processor recording, before each new token, the cache's bytes and rows."""

    def __init__(self, model):
        self.model, self.steps = model, []

    def __call__(self, ids, scores):
        cache = self.model.csp_backend.cache
        self.steps.append((cache.nbytes(), list(cache.rows), cache.reprunes))
        return scores


def generate(model, inputs, new_tokens, log=None):
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
            output_logits=True, return_dict_in_generate=True,
            logits_processor=LogitsProcessorList([log] if log else []),
        )  # fmt: skip
    return out.sequences, torch.stack(out.logits, 1)


@pytest.fixture(scope="module")
def bounded():
    model = tiny_model("llava")
    return csp_inductor.compile(model, CSP(), max_cache_tokens=100)


def test_bounded_generation_keeps_memory_flat_without_recompiling(bounded):
    inputs = tiny_inputs(bounded, "llava", batch=2, pads=[0, 9], seed=1)
    log = CacheLog(bounded)
    generate(bounded, inputs, 100, log)  # compiles the prefill, the decode step, a re-prune
    graphs = counters["stats"]["unique_graphs"]
    assert bounded.csp_backend.cache.reprunes >= 1
    log = CacheLog(bounded)
    generate(bounded, inputs, 300, log)
    sizes = {nbytes for nbytes, _, _ in log.steps}
    assert len(sizes) == 1  # the same buffers throughout
    assert max(max(rows) for _, rows, _ in log.steps) <= 100
    assert log.steps[-1][2] >= 3  # re-pruned again and again ...
    assert counters["stats"]["unique_graphs"] == graphs  # ... by the graphs compiled before
    assert bounded.csp_backend.fallback is None
    cache = bounded.csp_backend.cache
    for layer in cache.pruned:  # what is held stays in order, the newest tokens kept
        for row, length in enumerate(cache.rows):
            pos = layer.positions[row, :, :length]
            assert (pos[:, 1:] > pos[:, :-1]).all()
            assert (pos[:, -3:] == torch.arange(int(cache.seen) - 3, int(cache.seen))).all()


def stored_modality_is_right(cache, is_image: torch.Tensor) -> None:
    """Every held token's recorded modality is its own (``is_image`` over the conversation)."""
    for layer in cache.pruned:
        for row, length in enumerate(cache.rows):
            pos = layer.positions[row, :, :length]
            assert torch.equal(layer.images[row, :, :length], is_image[row][pos])
            assert not layer.images[row, :, length:].any()


@pytest.mark.parametrize("kernel", ["sdpa", "flex"])
def test_the_bound_holds_and_the_held_tokens_keep_their_modality(kernel):
    model = tiny_model("llava")
    csp_inductor.compile(model, CSP(), compile=False, kernel=kernel, max_cache_tokens=60)
    inputs = tiny_inputs(model, "llava", batch=2, pads=[0, 9], seed=5)
    log = CacheLog(model)
    sequences, _ = generate(model, inputs, 120, log)
    cache = model.csp_backend.cache
    assert max(max(rows) for _, rows, _ in log.steps) <= 60 and cache.reprunes >= 2
    is_image = torch.zeros_like(sequences, dtype=torch.bool)  # generated tokens are text
    prompt = inputs["input_ids"]
    is_image[:, : prompt.shape[1]] = prompt == model.config.image_token_id
    stored_modality_is_right(cache, is_image)
    assert cache.pruned[0].images.any()  # images survive the re-prunes


@pytest.mark.parametrize("policy", [CSP(), StreamingLLM()], ids=repr)
def test_a_bound_never_reached_changes_nothing(policy):
    model = tiny_model("llava")
    inputs = tiny_inputs(model, "llava", batch=2, pads=[0, 9], seed=2)
    csp_inductor.compile(model, policy, compile=False)
    want = generate(model, inputs, 20)
    csp_inductor.restore(model)
    csp_inductor.compile(model, policy, compile=False, max_cache_tokens=60)
    got = generate(model, inputs, 20)
    assert model.csp_backend.cache.reprunes == 0 and max(model.csp_backend.cache.rows) <= 60
    torch.testing.assert_close(got[1], want[1])
    assert torch.equal(got[0], want[0])


def test_a_turn_that_does_not_fit_reprunes_first():
    model = csp_inductor.compile(tiny_model("llava"), CSP(), compile=False, max_cache_tokens=90)
    inputs = tiny_inputs(model, "llava", seed=3)
    out = model.generate(
        **inputs, max_new_tokens=50, min_new_tokens=50, do_sample=False,
        return_dict_in_generate=True,
    )  # fmt: skip
    cache = out.past_key_values
    assert cache.reprunes == 0 and cache.room() < 46
    capacity = cache.pruned[0].keys.shape[2]
    gen = torch.Generator().manual_seed(0)
    text = torch.randint(3, 90, (1, 29), generator=gen)
    turn = torch.cat([text[:, :20], torch.full((1, 16), IMAGE_ID), text[:, 20:]], 1)  # 45
    ids = torch.cat([out.sequences, turn], 1)
    kwargs = dict(max_new_tokens=80, min_new_tokens=80, do_sample=False)
    pixels = torch.randn(1, 3, 32, 32, generator=gen)
    final = model.generate(input_ids=ids, pixel_values=pixels, past_key_values=cache, **kwargs)
    assert cache.reprunes == 2 and max(cache.rows) <= 90  # before the turn, and after it
    assert cache.pruned[0].keys.shape[2] == capacity
    is_image = final == IMAGE_ID
    is_image[:, ids.shape[1] :] = False  # generated tokens are text
    is_image[:, inputs["input_ids"].shape[1] : out.sequences.shape[1]] = False
    stored_modality_is_right(cache, is_image)


@pytest.mark.parametrize(
    ("policy", "bound", "message"),
    [
        (Full(), 50, r"needs a policy that prunes a cache of 50 tokens; Full\(\) keeps them all"),
        (H2O(), 50, "scores with every query, which a cache does not keep"),
        (CSP(), 1, "max_cache_tokens must be None .* or an int >= 2, got max_cache_tokens=1"),
        (CSP(), 10, r"max_cache_tokens=10 leaves no room .* kept tokens per row are \[\d+\]"),
    ],
)
def test_bad_bounds(policy, bound, message):
    model = tiny_model("llava")
    inputs = tiny_inputs(model, "llava", seed=4)
    with pytest.raises(ValueError, match=message):
        csp_inductor.compile(model, policy, compile=False, max_cache_tokens=bound)
        model.generate(**inputs, max_new_tokens=2)
