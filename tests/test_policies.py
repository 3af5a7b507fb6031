"""Budget arithmetic, every policy against the reference selection, and the validation errors."""

import pytest
import torch

import csp_inductor
from csp_inductor import CSP, H2O, Full, KNorm, LookM, SnapKV, StreamingLLM
from csp_inductor.budget import split_budget
from csp_inductor.policies.csp import QUERY_WINDOW
from csp_inductor.testing import random_prompt, reference_select


def test_budget_defaults_match_the_authors():
    b = split_budget(1000, budget=0.2, window_ratio=0.1)
    assert (b.hh, b.window, b.recent, b.k, b.k_self, b.k_cross, b.kept) == (
        100, 100, 100, 100, 50, 50, 200,
    )  # fmt: skip
    b = split_budget(1000, budget=0.4, window_ratio=0.1, recent_bias=0.5, cross_ratio=0.1)
    # hh = int(1000 * 0.3) even though 0.4 - 0.1 == 0.30000000000000004 in floating point
    assert (b.hh, b.recent, b.k, b.k_self, b.k_cross) == (300, 50, 350, 315, 35)
    assert split_budget(1000, 0.2, 0.1, cross_ratio=0.0).k_self == 100
    faithful = split_budget(5000, 0.2, 0.1, cross_ratio=0.0, faithful=True)
    assert (faithful.k_cross, faithful.k_self) == (1, 308)
    assert split_budget(9, 0.2, 0.1).keep_all  # no window query at all
    assert split_budget(1000, 1.0, 0.1).keep_all


def test_query_window_caps_the_scoring_queries_only():
    paper = split_budget(1000, 0.2, 0.1)
    for cap, window in ((64, 64), (100, 100), (5000, 100)):
        b = split_budget(1000, 0.2, 0.1, query_window=cap)
        assert b.window == window
        assert (b.recent, b.k, b.k_self, b.k_cross, b.kept) == (
            paper.recent, paper.k, paper.k_self, paper.k_cross, paper.kept,
        )  # fmt: skip
    assert split_budget(9, 0.2, 0.1, query_window=64).keep_all  # no recent token at all
    # the default caps the window at 64 queries; 0 and faithful=True leave the paper's
    assert CSP().budget_for(16000).window == QUERY_WINDOW == 64
    assert CSP().budget_for(500).window == 50
    assert CSP(query_window=0).budget_for(16000).window == 1600
    assert CSP(faithful=True).query_window == CSP.from_authors().query_window == 0
    assert CSP(faithful=True).budget_for(16000).window == 1600


def test_default_csp_spends_the_whole_budget_faithful_keeps_the_authors_count():
    # int(k * c) + int(k * (1 - c)) < k when k * c is not whole: the authors lose a token there
    assert CSP().budget_for(772).kept == SnapKV().budget_for(772).kept == 154
    assert CSP(faithful=True).budget_for(772).kept == 153
    for length in range(1, 3000):
        for policy in (CSP(), CSP(budget=0.35, window_ratio=0.05, cross_ratio=0.3)):
            other = SnapKV(budget=policy.budget, window_ratio=policy.window_ratio)
            assert policy.budget_for(length).kept == other.budget_for(length).kept, length


def test_authors_parametrisation_round_trips():
    p = CSP.from_authors(hh_ratio=0.3, recent_ratio=0.1, cross_ratio=0.9, kv_recent_bias=0.5)
    assert p.faithful and p.budget == 0.4
    b = p.budget_for(1234)
    assert (b.hh, b.window, b.recent) == (int(1234 * 0.3), 123, 61)


POLICY_CASES = [
    CSP(),
    CSP(budget=0.35, window_ratio=0.05, cross_ratio=0.9, n=0.0),
    CSP(cross_ratio=0.1, sink_tokens=3),
    CSP(query_window=4),
    CSP(budget=0.3, query_window=0),
    CSP(faithful=True),
    CSP.from_authors(cross_ratio=0.0),
    CSP.from_authors(recent_ratio=0.2, kv_recent_bias=0.5),
    H2O(),
    SnapKV(budget=0.3),
    LookM(),
    StreamingLLM(),
    KNorm(),
]


@pytest.mark.parametrize("policy", POLICY_CASES, ids=repr)
@pytest.mark.parametrize(
    ("pads", "layout", "seq"),
    [(None, "blocks", 97), ([0, 17, 40], "mixed", 101), ([5, 0], "text", 67), ([0], "image", 120)],
)
def test_select_equals_reference(policy, pads, layout, seq):
    p = random_prompt(len(pads or [0]), 4, 2, seq, 16, pads=pads, layout=layout, seed=seq)
    got = policy.select(p.q, p.k, p.is_image, p.key_padding)
    want = reference_select(policy, p.q, p.k, p.is_image, p.key_padding)
    assert torch.equal(got, want)
    # the count the cache allocates for is the count selected
    for b, pad in enumerate(pads or [0]):
        assert (got[b] >= 0).sum(-1).tolist() == [policy.budget_for(seq - pad).kept] * 2


@pytest.mark.parametrize(
    "policy", [csp_inductor.KVzip(), csp_inductor.Oracle(positions=((1, 2),))], ids=repr
)
@pytest.mark.parametrize("budget", [0.2, 1.0])
def test_reference_refuses_a_policy_it_does_not_cover(policy, budget):
    from dataclasses import replace

    p = random_prompt(1, 4, 2, 64, 16)
    with pytest.raises(TypeError, match=rf"{type(policy).__name__}; it covers Full, CSP, .*H2O"):
        reference_select(replace(policy, budget=budget), p.q, p.k, p.is_image)


def test_ties_go_to_the_lower_position():
    # zero queries attend uniformly: every key ties, so the earliest ones must win
    seq = 50
    q = torch.zeros(1, 2, seq, 8)
    k = torch.randn(1, 2, seq, 8)
    img = torch.zeros(1, seq, dtype=torch.bool)
    img[0, 10:30] = True
    for policy in (CSP(), CSP(faithful=True), SnapKV(), H2O()):
        kept = policy.select(q, k, img)
        b = policy.budget_for(seq)
        scored = kept[0, 0, : -b.recent]
        assert scored.tolist() == sorted(scored.tolist()), policy
        if isinstance(policy, H2O):  # column sums fall with position: earliest win anyway
            continue
        assert scored.max() < b.k + 10, (policy, scored)


def test_default_keeps_exactly_the_budget_of_distinct_tokens():
    p = random_prompt(3, 8, 4, 300, 16, pads=[0, 33, 120], layout="blocks", seed=1)
    policy = CSP(cross_ratio=0.5)
    kept = policy.select(p.q, p.k, p.is_image, p.key_padding)
    for b, pad in enumerate([0, 33, 120]):
        budget = policy.budget_for(300 - pad)
        for h in range(4):
            row = kept[b, h][kept[b, h] >= 0]
            assert len(row) == budget.kept == len(set(row.tolist()))
            assert row.min() >= pad  # padding is never kept
            assert row.tolist() == sorted(row.tolist())


def test_faithful_reproduces_duplicates_and_the_zero_cross_quirk():
    p = random_prompt(1, 4, 2, 400, 16, layout="blocks", seed=2)
    kept = CSP(faithful=True).select(p.q, p.k, p.is_image)
    budget = CSP(faithful=True).budget_for(400)
    assert kept.shape[-1] == budget.kept
    dups = [len(r) - len(set(r)) for r in kept[0].tolist()]
    assert max(dups) > 0  # a token good for both scores is stored twice, as in the authors' code
    quirk = CSP.from_authors(cross_ratio=0.0).select(
        *(random_prompt(1, 2, 2, 4000, 8, seed=4).__dict__[n] for n in ("q", "k", "is_image"))
    )
    assert quirk.shape[-1] == 1 + 308 + 400  # (k_cross, k_self) = (1, 308) + recent


def test_keep_all_and_full_keep_every_real_token():
    p = random_prompt(2, 2, 2, 30, 8, pads=[0, 4])
    for policy in (Full(), CSP(budget=1.0), H2O(budget=1.0)):
        kept = policy.select(p.q, p.k, p.is_image, p.key_padding)
        assert kept[0, 0].tolist() == list(range(30))
        assert kept[1, 0].tolist() == [*range(4, 30), -1, -1, -1, -1]


def test_a_prompt_without_images_scores_text_only_and_warns():
    p = random_prompt(1, 4, 2, 80, 8, layout="text")
    with pytest.warns(UserWarning, match="no image tokens"):
        kept = CSP().select(p.q, p.k, p.is_image)
    assert kept.shape[-1] == CSP().budget_for(80).kept


def test_make_policy_builds_every_policy():
    for name, cls in csp_inductor.POLICIES.items():
        assert isinstance(csp_inductor.make_policy(name), cls)
    assert csp_inductor.make_policy("snapkv", budget=0.1, window_ratio=0.05).budget == 0.1


class _GivenScores(csp_inductor.policies.ScoredPolicy):
    """Ranks by the scores the caller passes (as FromKVPress does with a press's)."""

    needs_layer_inputs = True
    name = "given"

    def score(self, prompt):
        return prompt.scores


def test_given_scores_follow_their_rows_wherever_the_padding_is():
    p = random_prompt(batch=1, q_heads=4, kv_heads=2, seq=40, seed=5)
    scores = torch.randn(1, 2, 40, generator=torch.Generator().manual_seed(0))
    policy = _GivenScores(budget=0.3, window_ratio=0.1)
    left = torch.zeros(1, 40, dtype=torch.bool)
    left[:, :6] = True
    want = policy.select(p.q, p.k, p.is_image, left, scores=scores)
    # the same row padded on the right: every tensor rolled, the kept positions too
    roll = lambda x, dim: x.roll(-6, dims=dim)  # noqa: E731
    got = policy.select(
        roll(p.q, 2), roll(p.k, 2), roll(p.is_image, 1), roll(left, 1), scores=roll(scores, 2)
    )
    assert torch.equal(got, (want - 6).masked_fill(want < 0, -1))
    with pytest.raises(ValueError, match=r"scores must be \(batch, kv_heads, seq\)"):
        policy.select(p.q, p.k, p.is_image, scores=scores[..., :-1])
    with pytest.raises(ValueError, match="needs them"):
        policy.select(p.q, p.k, p.is_image)
    with pytest.raises(ValueError, match="does not use them"):
        KNorm(0.3).select(p.q, p.k, p.is_image, scores=scores)
