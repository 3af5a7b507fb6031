"""Property tests: scoring and every policy's selection against the fp64 reference, over
generated prompts (lengths, batches, GQA groups, padding on the left, the right or inside a row,
modality layouts, dtypes and policy options). More than 1,000 cases per run; see conftest.py
for the profiles.

Tolerances: scores are fp32 whatever the input dtype (bf16/fp16 inputs are upcast before any
arithmetic), so they match the fp64 reference on the same input values to 1e-5 (relative and
absolute) for fp32, bf16 and fp16 inputs alike. Selection is compared exactly.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import csp_inductor
from csp_inductor import CSP, H2O, Full, KNorm, LookM, RandomKeep, SnapKV, StreamingLLM, reference
from csp_inductor.testing import LAYOUTS, random_prompt, reference_select

# text-only prompts are generated on purpose; CSP says once per prompt that it scores them so
pytestmark = pytest.mark.filterwarnings("ignore:CSP. a prompt has no image tokens")

SCORING_CASES = 500
SELECTION_CASES = 600


@st.composite
def prompts(draw, max_seq: int = 70):
    seq = draw(st.integers(2, max_seq))
    batch = draw(st.integers(1, 3))
    kv_heads = draw(st.sampled_from([1, 2]))
    pads = draw(st.lists(st.integers(0, seq - 1), min_size=batch, max_size=batch))
    return dict(
        batch=batch,
        q_heads=kv_heads * draw(st.sampled_from([1, 2, 4])),
        kv_heads=kv_heads,
        seq=seq,
        head_dim=draw(st.sampled_from([3, 8, 17, 32])),
        pads=pads if draw(st.booleans()) else None,
        layout=draw(st.sampled_from(LAYOUTS)),
        seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=SCORING_CASES, deadline=None)
@given(
    case=prompts(),
    window=st.floats(0.0, 1.0),
    n=st.sampled_from([0.0, 1.0, 3.0]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    masked_rows=st.booleans(),
)
def test_fast_scoring_equals_fp64_reference(case, window, n, dtype, masked_rows):
    p = random_prompt(**case, dtype=dtype)
    width = max(1, round(window * case["seq"]))
    q_window = p.q[:, :, -width:]
    window_mask = None
    if masked_rows:
        window_mask = torch.arange(width) >= torch.arange(case["batch"])[:, None]
    kwargs = dict(n=n, key_padding=p.key_padding, window_mask=window_mask)
    ours = csp_inductor.decomposed_scores(q_window, p.k, p.is_image, **kwargs)
    # the reference sees the very same (possibly rounded) values, in fp64
    ref = reference.decomposed_scores(q_window.double(), p.k.double(), p.is_image, **kwargs)
    assert ours.dtype == torch.float32
    assert ours.shape == (p.k.shape[0], p.k.shape[1], 2, p.k.shape[2])
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5)
    if p.key_padding is not None:
        assert not ours.masked_select(p.key_padding[:, None, None, :]).any()


@st.composite
def policies(draw):
    kind = draw(st.sampled_from(["csp", "h2o", "snapkv", "lookm", "streamingllm", "knorm", "full"]))
    if kind == "full":
        return Full()
    budget = draw(st.sampled_from([0.1, 0.2, 0.3, 0.5, 0.8, 1.0]))
    window_ratio = draw(st.sampled_from([0.05, 0.1, budget / 2, budget]))
    if kind != "csp":
        cls = {"h2o": H2O, "snapkv": SnapKV, "lookm": LookM}
        cls |= {"streamingllm": StreamingLLM, "knorm": KNorm}
        return cls[kind](budget=budget, window_ratio=window_ratio)
    faithful = draw(st.booleans())
    return CSP(
        budget=budget,
        window_ratio=window_ratio,
        cross_ratio=draw(st.sampled_from([0.0, 0.1, 0.5, 0.7, 1.0])),
        n=draw(st.sampled_from([0.0, 1.0, 3.0])),
        sink_tokens=0 if faithful else draw(st.integers(0, 4)),
        faithful=faithful,
        recent_bias=draw(st.sampled_from([1.0, 0.5])),
        query_window=None if faithful else draw(st.sampled_from([0, 1, 4, 64])),
    )


def moved_padding(pads: list[int], seq: int, cut: float) -> torch.Tensor:
    """(batch, seq) long: each row's order with its left padding moved after the first
    ``int(cut * real)`` real tokens (cut 0: left padding as generated, 1: right padding,
    between: padding inside the row, as a conversation turn has it)."""
    rows = []
    for pad in pads:
        real = list(range(pad, seq))
        split = int(cut * len(real))
        rows.append(real[:split] + list(range(pad)) + real[split:])
    return torch.tensor(rows)


def reorder(x, order, dim):
    shape = [x.shape[0]] + [1] * (x.dim() - 1)
    shape[dim] = x.shape[dim]
    return x.gather(dim, order.view(shape).expand(x.shape))


@settings(max_examples=SELECTION_CASES, deadline=None)
@given(case=prompts(max_seq=90), policy=policies(), cut=st.sampled_from([0.0, 0.3, 0.5, 1.0]))
def test_selection_equals_reference(case, policy, cut):
    p = random_prompt(**case)
    pads = case["pads"] or [0] * case["batch"]
    want = reference_select(policy, p.q, p.k, p.is_image, p.key_padding)
    if cut and case["pads"] is not None:
        # the same rows padded on the right or inside: the same tokens, at their new positions
        order = moved_padding(pads, case["seq"], cut)
        q, k = reorder(p.q, order, 2), reorder(p.k, order, 2)
        is_image, padding = reorder(p.is_image, order, 1), reorder(p.key_padding, order, 1)
        got = policy.select(q, k, is_image, padding)
        back = order[:, None, :].expand(-1, got.shape[1], -1).gather(2, got.clamp_min(0))
        got = torch.where(got >= 0, back, -1)
    else:
        got = policy.select(p.q, p.k, p.is_image, p.key_padding)
    assert torch.equal(got, want)
    for row, pad in zip(got, pads, strict=True):
        kept = policy.budget_for(case["seq"] - pad).kept
        assert ((row >= 0).sum(dim=-1) == kept).all()  # the count the cache allocates for
        assert (row[row >= 0] >= pad).all()  # padding is never kept


def test_random_keep_equals_reference_and_is_deterministic():
    p = random_prompt(1, 4, 2, 90, 8, seed=3)
    policy = RandomKeep(seed=7)
    got = policy.select(p.q, p.k, p.is_image)
    assert torch.equal(got, reference_select(policy, p.q, p.k, p.is_image))
    assert torch.equal(got, policy.select(p.q, p.k, p.is_image))
    assert not torch.equal(got, RandomKeep(seed=8).select(p.q, p.k, p.is_image))
