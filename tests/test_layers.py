"""Budgets shared among the layers (``layers="pyramid"``): the allocation rule, each layer's
selection of its own count, a cache holding exactly the kept tokens, and the refusals."""

import sys
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import csp_inductor
from csp_inductor import CSP, H2O, KVzip, SnapKV
from csp_inductor.allocation import allocate, attention_density, pyramid_weights
from csp_inductor.backend import adaptive
from csp_inductor.testing.reference import reference_select

sys.path.insert(0, str(Path(__file__).parent))
from test_backend import _left_padded, greedy, prompt, tiny_llava

PYRAMIDS = [CSP(layers="pyramid"), SnapKV(layers="pyramid"), H2O(budget=0.3, layers="pyramid")]


@given(
    total=st.integers(0, 5000),
    weights=st.lists(st.floats(0, 10), min_size=1, max_size=12).filter(lambda w: sum(w) > 0),
    cap=st.integers(0, 800),
)
def test_allocate_shares_the_total_under_the_cap(total, weights, cap):
    out = allocate(total, weights, cap)
    assert sum(out) == min(total, cap * len(weights))
    assert all(0 <= n <= cap for n in out)
    # proportional: below the cap no part is a whole token away from its share of what the
    # uncapped parts got
    free = [i for i, n in enumerate(out) if n < cap]
    weight = sum(weights[i] for i in free)
    left = sum(out[i] for i in free)
    for i in free if weight else ():
        assert abs(out[i] - left * weights[i] / weight) < 1 + 1e-9


def test_allocate_refuses_what_it_cannot_share():
    with pytest.raises(ValueError, match="weights >= 0 with a positive sum"):
        allocate(10, [0.0, 0.0], 5)
    with pytest.raises(ValueError, match="total=-1"):
        allocate(-1, [1.0], 5)


def test_pyramid_weights_fall_linearly_with_mean_one():
    w = pyramid_weights(8)
    assert w == sorted(w, reverse=True) and w[0] == pytest.approx(2 - 1 / 20)
    assert w[-1] == pytest.approx(1 / 20) and sum(w) / len(w) == pytest.approx(1.0)
    assert pyramid_weights(1) == [1.0]


@pytest.mark.parametrize("policy", PYRAMIDS, ids=repr)
@pytest.mark.parametrize("length", [37, 200, 1001])
def test_layer_counts_keep_the_uniform_total(policy, length):
    budget = policy.budget_for(length)
    counts = policy.layer_counts(length, 6)
    assert sum(counts) == 6 * budget.kept  # the model-wide total is the budget
    assert counts == sorted(counts, reverse=True)
    assert all(budget.recent <= n <= length for n in counts)
    uniform = type(policy)(**{**policy.__dict__, "layers": "uniform"})
    assert uniform.layer_counts(length, 6) == [budget.kept] * 6


def test_a_layer_of_a_large_budget_is_capped_and_the_rest_shared():
    policy = CSP(budget=0.8, layers="pyramid")
    budget, counts = policy.budget_for(100), policy.layer_counts(100, 4)
    assert counts[0] == 100  # the first layer keeps everything it could
    assert sum(counts) == 4 * budget.kept


@pytest.mark.parametrize("policy", PYRAMIDS, ids=repr)
def test_select_keeps_each_layers_count_and_the_uniform_selection_at_its_count(policy):
    """``select(kept=...)`` keeps exactly that many per row; at the uniform count it is the
    uniform selection; a smaller count keeps a subset of the recent tokens' complement."""
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 90, 16), torch.randn(2, 2, 90, 16)
    is_image = torch.zeros(2, 90, dtype=torch.bool)
    is_image[:, 20:60] = True
    padding = torch.zeros(2, 90, dtype=torch.bool)
    padding[1, :15] = True  # row 1: 75 real tokens, left-padded
    uniform = type(policy)(**{**policy.__dict__, "layers": "uniform"})
    want = uniform.select(q, k, is_image, padding)
    full = [policy.budget_for(90).kept, policy.budget_for(75).kept]
    assert torch.equal(policy.select(q, k, is_image, padding, kept=full), want)
    for kept in ([30, 20], [full[0] + 11, 75]):
        idx = policy.select(q, k, is_image, padding, kept=kept)
        assert (idx >= 0).sum(-1).tolist() == [[kept[0]] * 2, [kept[1]] * 2]
        assert not (padding[1][idx[1].clamp_min(0)] & (idx[1] >= 0)).any()  # never padding
        recent = uniform.budget_for(75).recent
        kept_row = set(idx[1, 0, : kept[1]].tolist())
        assert set(range(90 - recent, 90)) <= kept_row  # the recent tokens stay


@pytest.mark.parametrize("policy", PYRAMIDS, ids=repr)
def test_select_at_a_layers_count_equals_the_reference(policy):
    """Random prompts, GQA, a batch of 2 with left padding: the kept positions at each of
    several counts equal the dense fp64 reference at that count."""
    gen = torch.Generator().manual_seed(7)
    q, k = torch.randn(2, 4, 70, 8, generator=gen), torch.randn(2, 2, 70, 8, generator=gen)
    is_image = torch.rand(2, 70, generator=gen) < 0.5
    padding = torch.zeros(2, 70, dtype=torch.bool)
    padding[0, :9] = True
    for kept in ([policy.budget_for(61).kept, policy.budget_for(70).kept], [12, 40], [61, 8]):
        got = policy.select(q, k, is_image, padding, kept=kept)
        want = reference_select(policy, q, k, is_image, padding, kept=kept)
        assert torch.equal(got, want), kept


def test_select_refuses_a_count_below_the_recent_tokens():
    policy = CSP(layers="pyramid")
    q, k = torch.randn(1, 2, 100, 8), torch.randn(1, 2, 100, 8)
    with pytest.raises(ValueError, match="cannot keep kept=3"):
        policy.select(q, k, torch.zeros(1, 100, dtype=torch.bool), kept=[3])


@pytest.fixture(scope="module")
def pyramid_model():
    model = csp_inductor.compile(tiny_llava(), CSP(layers="pyramid"))
    yield model
    csp_inductor.restore(model)


def test_each_layer_holds_exactly_its_kept_tokens(pyramid_model):
    inputs = prompt([100, 100, 100, 97], seed=4)  # 445 prompt tokens
    greedy(pyramid_model, inputs, steps=5)
    cache = pyramid_model.csp_backend.cache
    kept = CSP().budget_for(445).kept
    counts = CSP(layers="pyramid").layer_counts(445, 3)
    assert [rows[0] for rows in cache.layer_rows] == [n + 4 for n in counts]  # 4 decoded
    assert counts[0] > kept > counts[2] and sum(counts) == 3 * kept
    per_layer_token = 2 * 2 * 16 * 4  # (K, V) x kv_heads x head_dim x fp32
    # each layer: its kept tokens and the decode room (5 slots), nothing else
    assert cache.nbytes() == sum(n + 5 for n in counts) * per_layer_token
    assert cache.kept_prompt == [kept]  # the mean over the layers, what reports read
    assert cache.held == [kept + 4] and cache.rows == [counts[0] + 4]  # (rows: the longest)


def test_compiled_equals_eager_one_graph_per_phase_and_batch(pyramid_model):
    from torch._dynamo.utils import counters

    eager = csp_inductor.compile(tiny_llava(), CSP(layers="pyramid"), compile=False)
    batch = _left_padded(prompt([30, 25, 40, 10], seed=2), prompt([12, 20], seed=4))
    counters.clear()
    graphs = pyramid_model.csp_backend.graphs
    for inputs in (prompt([20, 30, 40, 12], seed=1), prompt([35, 9, 50, 20, 7], seed=2), batch):
        assert torch.equal(greedy(pyramid_model, inputs, 12), greedy(eager, inputs, 12))
    assert dict(counters["graph_break"]) == {}
    rows = pyramid_model.csp_backend.cache.layer_rows
    assert rows[0][0] > rows[2][0] and rows[0][1] > rows[2][1]  # each row its own counts
    # a new prompt length makes no new graph (the batch of 2 makes its own pair, as uniform)
    assert pyramid_model.csp_backend.graphs - graphs <= 2


def test_per_row_batch_equals_each_row_alone():
    model = csp_inductor.compile(tiny_llava(), SnapKV(layers="pyramid"), compile=False)
    rows = [prompt([30, 25, 40, 10], seed=2), prompt([12, 20], seed=4)]
    batch = greedy(model, _left_padded(*rows), 6)
    for row, inputs in enumerate(rows):
        assert torch.equal(batch[row : row + 1], greedy(model, inputs, 6))


def test_refusals_name_the_option():
    with pytest.raises(ValueError, match=r"layers must be one of \('uniform', 'pyramid', 'adap"):
        CSP(layers="by-head")
    with pytest.raises(ValueError, match=r"layers='adaptive' reads .* H2O ranks by other"):
        H2O(layers="adaptive")
    with pytest.raises(ValueError, match=r"give one per layer \(3\), got density=None"):
        CSP(layers="adaptive").layer_counts(500, 3)
    with pytest.raises(ValueError, match=r"faithful=True .* same count in every layer"):
        CSP(faithful=True, layers="pyramid")
    assert KVzip(layers="adaptive").layer_rule == "adaptive"  # (scored by the re-read)
    for options in ({"max_cache_tokens": 200}, {"prefill_chunk": 64}):
        with pytest.raises(ValueError, match="layers='pyramid' is not supported with"):
            csp_inductor.compile(tiny_llava(), CSP(layers="pyramid"), compile=False, **options)


def test_turns_keep_their_count_in_every_layer_padded_or_not():
    """A turn after a prompt of layers of their own counts: every layer keeps the turn's
    count; a batch's padded turn gives each row the logits it gets alone."""
    model = csp_inductor.compile(tiny_llava(), CSP(layers="pyramid"), compile=False)
    rows = [prompt([60, 25, 40, 10], seed=2), prompt([32, 20], seed=4)]
    turns = [
        torch.randint(1, 90, (1, n), generator=torch.Generator().manual_seed(n)) for n in (120, 70)
    ]
    alone = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (text-only turns)
        for inputs, turn in zip(rows, turns, strict=True):
            cache = model.csp_backend.new_cache()
            model(**inputs, past_key_values=cache)
            before = [rows[0] for rows in cache.layer_rows]
            mask = torch.ones(1, inputs["input_ids"].shape[1] + turn.shape[1], dtype=torch.long)
            out = model(input_ids=turn, attention_mask=mask, past_key_values=cache)
            kept = CSP().budget_for(turn.shape[1]).kept
            assert [rows[0] for rows in cache.layer_rows] == [n + kept for n in before]
            assert [int(layer.lengths[0]) for layer in cache.pruned] == [n + kept for n in before]
            alone.append(out.logits[0, -1])
        batch = _left_padded(*rows)
        cache = model.csp_backend.new_cache()
        model(**batch, past_key_values=cache)
        turn = torch.zeros(2, 120, dtype=torch.long)
        turn[0], turn[1, 50:] = turns[0][0], turns[1][0]
        mask = torch.cat([batch["attention_mask"], torch.ones_like(turn)], 1)
        mask[1, -120:-70] = 0  # row 1's turn is shorter: left-padded inside the conversation
        out = model(input_ids=turn, attention_mask=mask, past_key_values=cache)
    for row in range(2):  # (uniform layers differ by 1e-3 here too: the turn's padding)
        torch.testing.assert_close(out.logits[row, -1], alone[row], atol=3e-3, rtol=0)


def test_attention_density_is_the_share_of_keys_holding_most_attention():
    scores = torch.zeros(2, 1, 2, 10)
    scores[0, 0, 0, :] = 1.0  # row 0: spread evenly over its 10 keys
    scores[1, 0, 1, 7] = 5.0  # row 1: all on one key, 4 of its keys padding
    padding = torch.zeros(2, 10, dtype=torch.bool)
    padding[1, :4] = True
    assert attention_density(scores, padding).tolist() == pytest.approx([0.9, 1 / 6])


@pytest.mark.parametrize("policy", [CSP(layers="adaptive"), SnapKV(layers="adaptive")], ids=repr)
@pytest.mark.parametrize("seed", range(3))
def test_a_selection_at_a_smaller_count_is_a_subset(policy, seed):
    """What the adaptive trim relies on: from the same scores, fewer kept tokens are a subset
    of more (each row left-padded its own way)."""
    gen = torch.Generator().manual_seed(seed)
    seq, heads = 120, 2
    scores = torch.rand(2, heads, 2, seq, generator=gen)
    is_image = torch.rand(2, seq, generator=gen) < 0.6
    padding = torch.zeros(2, seq, dtype=torch.bool)
    padding[1, :31] = True
    unused = torch.zeros(()).expand(2, heads, seq, 1)
    largest = [policy.prefill_count(seq), policy.prefill_count(seq - 31)]
    big = policy.select(unused, unused, is_image, padding, window_scores=scores, kept=largest)
    for kept in ([13, 12], [30, 9], largest):
        small = policy.select(unused, unused, is_image, padding, window_scores=scores, kept=kept)
        for row in range(2):
            for head in range(heads):
                got = set(small[row, head][small[row, head] >= 0].tolist())
                assert len(got) == kept[row]
                assert got <= set(big[row, head].tolist())


@pytest.fixture
def fixed_density(monkeypatch):
    """Adaptive layers of densities 3 : 1 : 2, and pyramid layers of the same weights: the
    two allocate alike, one trimming after the prefill, the other keeping its count at it."""
    weights = [3.0, 1.0, 2.0]
    calls = iter(range(10**6))

    def density(scores, padding):
        return torch.full((scores.shape[0],), weights[next(calls) % 3])

    monkeypatch.setattr(adaptive, "attention_density", density)
    monkeypatch.setattr(csp_inductor.policies.base, "pyramid_weights", lambda layers: list(weights))
    return weights


@pytest.mark.parametrize("policy", [CSP(budget=0.15), SnapKV(budget=0.15)], ids=repr)
def test_an_adaptive_layer_holds_what_a_prefill_at_its_count_keeps(fixed_density, policy):
    from dataclasses import replace

    batch = _left_padded(prompt([60, 25, 40, 10], seed=2), prompt([32, 20], seed=4))
    runs = {}
    for rule in ("adaptive", "pyramid"):
        model = csp_inductor.compile(tiny_llava(), replace(policy, layers=rule), compile=False)
        tokens = greedy(model, batch, 6)
        cache = model.csp_backend.cache
        held = [layer.positions[:, :, : max(rows)] for layer, rows in
                zip(cache.pruned, cache.layer_rows, strict=True)]  # fmt: skip
        runs[rule] = tokens, held, cache.layer_rows, cache.nbytes()
    (tokens, held, rows, nbytes), want = runs["adaptive"], runs["pyramid"]
    assert rows == want[2] and rows[0][0] > rows[2][0] > rows[1][0]
    assert all(torch.equal(a, b) for a, b in zip(held, want[1], strict=True))
    assert torch.equal(tokens, want[0]) and nbytes == want[3]  # the trimmed buffers given back


def test_compiled_adaptive_equals_eager_without_graph_breaks():
    from torch._dynamo.utils import counters

    compiled = csp_inductor.compile(tiny_llava(), SnapKV(layers="adaptive"))
    eager = csp_inductor.compile(tiny_llava(), SnapKV(layers="adaptive"), compile=False)
    counters.clear()
    for inputs in (prompt([20, 30, 40, 12], seed=1), prompt([35, 9, 50, 20, 7], seed=2)):
        assert torch.equal(greedy(compiled, inputs, 8), greedy(eager, inputs, 8))
        assert compiled.csp_backend.cache.layer_rows == eager.csp_backend.cache.layer_rows
    assert dict(counters["graph_break"]) == {}
    assert compiled.csp_backend.graphs == 2  # a prefill and a decode step, for both lengths
