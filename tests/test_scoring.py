"""The n-softmax and the decomposed scores against the fp64 reference and the authors' code."""

import math
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import csp_inductor
from csp_inductor import reference
from csp_inductor.testing import authors_softmax_n, random_prompt

EXTREME_ROWS = [
    [0.0, 0.0, 0.0],
    [1000.0, -1000.0, 5.0],
    [-1000.0, -1000.0, -1000.0],
    [88.0, 89.0, 90.0],
    [-math.inf, 3.0, 2.0],
    [1e-30, -1e-30, 0.0],
]


@pytest.mark.parametrize("n", [0.0, 1.0, 3.0, 1e6])
def test_n_softmax_matches_the_authors_softmax_n(n):
    softmax_n = authors_softmax_n()
    x = torch.tensor(EXTREME_ROWS, dtype=torch.float64)
    ours = csp_inductor.n_softmax(x, n=n)
    theirs = softmax_n(x, n=n)
    ok = theirs.isfinite()
    torch.testing.assert_close(ours[ok], theirs[ok], rtol=1e-12, atol=1e-300)
    # theirs computes n·exp(-max) = 0·inf = NaN for n = 0 on very negative rows; ours is the
    # softmax there, which is the limit of softmax_n as n -> 0
    if not ok.all():
        assert n == 0.0
        torch.testing.assert_close(ours[~ok], torch.softmax(x, -1)[~ok])


def test_n_softmax_reduces_to_softmax_and_sums_below_one():
    x = torch.randn(5, 33, dtype=torch.float64) * 10
    torch.testing.assert_close(csp_inductor.n_softmax(x, n=0.0), torch.softmax(x, -1))
    total = csp_inductor.n_softmax(x, n=1.0).sum(-1)
    expected = 1 / (1 + torch.exp(-torch.logsumexp(x, -1)))
    torch.testing.assert_close(total, expected)


def test_n_softmax_dim_dtype_and_masked_rows():
    x = torch.randn(4, 7, 5).to(torch.bfloat16)
    out = csp_inductor.n_softmax(x, n=1.0, dim=1)
    assert out.dtype == torch.bfloat16
    ref = reference.n_softmax(x.double(), n=1.0, dim=1)
    torch.testing.assert_close(out.double(), ref, atol=1e-2, rtol=1e-2)
    masked = torch.full((2, 3), -math.inf)
    assert torch.equal(csp_inductor.n_softmax(masked, n=1.0), torch.zeros(2, 3))


def test_chunking_does_not_change_the_result():
    p = random_prompt(2, 4, 2, 97, 16, pads=[0, 11], layout="mixed")
    args = (p.q[:, :, -31:], p.k, p.is_image, 1.0, 0.25, p.key_padding, None)
    whole = csp_inductor.scoring.decomposed_scores_torch(*args)
    # 3 rows per chunk: a chunk holds group·rows·seq logits (one KV head at a time)
    chunked = csp_inductor.scoring.decomposed_scores_torch(*args, chunk_elements=2 * 3 * 97)
    torch.testing.assert_close(whole, chunked)


@pytest.mark.parametrize("group", [1, 4])
def test_scores_from_the_attentions_log_sum_exp(group):
    """The prefill hands the scorer its causal kernel's log-sum-exp and scores only the keys
    before the recent window: same scores there, zeros after."""
    p = random_prompt(1, 4 * group, 4, 90, 16, layout="mixed", seed=group)
    window, columns = 23, 70
    mask = torch.arange(window) >= 5  # a shorter own window, as a padded batch row has
    _, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        p.q, p.k.repeat_interleave(group, 1), p.k.repeat_interleave(group, 1), 0.0, True,
        scale=0.25,
    )  # fmt: skip
    args = (p.q[:, :, -window:], p.k, p.is_image, 1.0, 0.25, None, mask[None])
    ours = csp_inductor.scoring.decomposed_scores_torch(
        *args, lse=lse[:, :, -window:], columns=columns, chunk_elements=group * 3 * columns
    )
    ref = reference.decomposed_scores(
        p.q[:, :, -window:].double(), p.k.double(), p.is_image, n=1.0, scale=0.25,
        window_mask=mask[None],
    )  # fmt: skip
    scored = ours[..., :columns].double()
    torch.testing.assert_close(scored, ref[..., :columns], rtol=1e-5, atol=1e-7)
    assert not ours[..., columns:].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
def test_window_rows_attention_and_scores_from_one_pass(group, dtype, fused, monkeypatch):
    """The prefill's window rows: their causal attention (with padding) from the same logits
    as their scores, which equal the scorer's own to the last bit. Row 1's padding reaches
    into the window: its padding queries there get zeros (finite), its real ones the usual.
    ``fused``: the exponentials through the CPU kernel at any size (it takes chunks of more
    than one logit column, here those of ``group`` 4)."""
    calls = []
    kernel = csp_inductor.scoring._fused_exp_shifted_
    monkeypatch.setattr(
        csp_inductor.scoring, "_fused_exp_shifted_", lambda *a: calls.append(1) or kernel(*a)
    )
    if fused:
        monkeypatch.setattr(csp_inductor.scoring, "FUSED_MIN_LOGITS", 0)
    seq, window = 61, 19
    p = random_prompt(2, 4 * group, 4, seq, 16, pads=[0, 45], layout="mixed", dtype=dtype)
    v = torch.randn(p.k.shape, generator=torch.Generator().manual_seed(group)).to(dtype)
    mask = torch.arange(window) >= torch.tensor([[4], [0]])  # a shorter own window in row 0
    args = (p.q[:, :, -window:], p.k, p.is_image, 1.0, 0.25, p.key_padding, mask)
    out, scores = csp_inductor.scoring.window_attention_torch(
        args[0], p.k, v, *args[2:], chunk_elements=group * seq
    )
    assert out.dtype == dtype and out.shape == (2, 4 * group, window, 16)
    alone = csp_inductor.scoring.decomposed_scores_torch(*args, chunk_elements=group * seq)
    assert torch.equal(scores, alone)
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    allowed = (causal & ~p.key_padding[:, None, :])[:, None]
    want = torch.nn.functional.scaled_dot_product_attention(
        p.q.double(), p.k.double(), v.double(), attn_mask=allowed, scale=0.25, enable_gqa=True
    )[:, :, -window:]
    padding_rows = p.key_padding[:, -window:]  # (row 1: 45 - 42 = 3 padding queries)
    real = ~padding_rows[:, None, :, None]
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close((out.double() * real), want.nan_to_num() * real, rtol=tol, atol=tol)
    assert int(padding_rows.sum()) == 3
    assert not out[1][:, padding_rows[1]].any()
    assert bool(calls) == (fused and group > 1)


def test_window_prefill_op_is_the_prefill_attention_and_the_policy_scores():
    """One prompt attention for every row, and the window scorer's scores, from the op the
    CPU prefill calls; a policy that scores no window gets the plain attention."""
    from csp_inductor.attention import prefill_attention
    from csp_inductor.policy_table import register_policy

    p = random_prompt(2, 4, 2, 80, 16, pads=[0, 9], layout="blocks", seed=3)
    v = torch.randn_like(p.k)
    want = prefill_attention(
        p.q, p.k, v, scale=0.25, key_padding=p.key_padding, sliding_window=None, kernel="sdpa"
    )
    real = ~p.key_padding[:, :, None, None]  # padding queries are don't-care
    for policy in (csp_inductor.CSP(0.3), csp_inductor.SnapKV(0.3), csp_inductor.H2O(0.3)):
        index = torch.tensor(register_policy(policy))
        args = (p.q, p.k, v, p.is_image, p.key_padding, index, 0.25)
        out, scores = torch.ops.csp_inductor.window_prefill(*args)
        torch.testing.assert_close(out * real, want * real, rtol=1e-5, atol=1e-6)
        window = policy.scoring_window(80, p.key_padding)
        assert (window is None) == isinstance(policy, csp_inductor.H2O)
        if window is not None:
            width = window.mask.shape[1]
            alone = csp_inductor.scoring.decomposed_scores_torch(
                p.q[:, :, -width:], p.k, p.is_image, policy.window_n, 0.25, p.key_padding,
                window.mask,
            )  # fmt: skip
            assert torch.equal(scores, alone)
        torch.library.opcheck(torch.ops.csp_inductor.window_prefill.default, args)


def test_fused_exponentials_match_the_eager_ops():
    """The CPU kernel of the window pass (Inductor's) against eager's ops, masked keys, a
    column with no key and an infinite shift included, at two chunk shapes, one graph."""
    from csp_inductor.scoring import _exp_shifted_, _fused_exp_shifted_

    torch.manual_seed(0)
    graphs = []
    for seq, cols in ((300, 64), (77, 12)):
        logits = torch.randn(seq, cols) * 4
        logits[seq // 2 :, 3] = -math.inf
        logits[:, 5] = -math.inf
        shift = logits.amax(dim=0).clamp_min(torch.finfo(torch.float32).min)
        shift[7] = math.inf  # (a row the log-sum-exp path finds empty)
        eager, fused = logits.clone(), logits.clone()
        _exp_shifted_(eager, shift)
        _fused_exp_shifted_(fused, shift)
        graphs.append(_fused_exp_shifted_.graphs)
        torch.testing.assert_close(fused, eager, rtol=1e-6, atol=0.0)
        assert fused[:, 5].eq(0).all() and fused[seq // 2 :, 3].eq(0).all()
        assert fused[:, 7].eq(0).all() and fused[:, 8].gt(0).any()
    assert _fused_exp_shifted_.failure is None
    assert graphs[0] >= 1 and graphs[1] == graphs[0]  # compiled, and for any shape


def test_a_fused_kernel_the_compiler_fails_on_runs_eagerly_with_one_warning(monkeypatch):
    from csp_inductor.compiled import Fused

    def fail(*args):
        raise torch._dynamo.exc.TorchDynamoException("no compiler here")

    fused = Fused(torch.Tensor.exp_, "a test chain")
    monkeypatch.setattr(fused, "compiled", fail)
    x = torch.randn(5)
    with pytest.warns(RuntimeWarning, match="torch.compile failed on a test chain"):
        assert torch.equal(fused(x.clone()), x.exp())
    assert fused.failure.startswith("TorchDynamoException: no compiler here")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(fused(x.clone()), x.exp())


def test_a_fused_kernel_runs_eagerly_under_a_dispatch_mode():
    """Dynamo does not trace under a dispatch mode (a FLOP counter here): the function runs
    as it is, and compiles once the mode is gone."""
    from torch.utils.flop_counter import FlopCounterMode

    from csp_inductor.compiled import Fused

    def double_(x):
        x.mul_(2)

    fused = Fused(double_, "a test chain")
    x = torch.ones(6, 3)
    with FlopCounterMode(display=False):
        fused(x)
    assert fused.graphs == 0 and fused.failure is None and x.eq(2).all()
    fused(x)
    assert fused.graphs == 1 and x.eq(4).all()


def test_self_plus_cross_is_the_total_column_sum():
    p = random_prompt(1, 4, 4, 50, 8, layout="blocks")
    s = csp_inductor.decomposed_scores(p.q[:, :, -10:], p.k, p.is_image, n=0.0)
    total = reference.column_softmax_sums(p.q[:, :, -10:].double(), p.k.double())
    torch.testing.assert_close(s.sum(2).double(), total, rtol=1e-5, atol=1e-6)


def test_backends_agree():
    p = random_prompt(2, 4, 2, 40, 8, pads=[3, 0], layout="mixed")
    args = (p.q[:, :, -9:], p.k, p.is_image)
    kw = dict(n=1.0, key_padding=p.key_padding)
    ref = csp_inductor.decomposed_scores(*args, backend="reference", **kw)
    for backend in ("auto", "torch"):
        out = csp_inductor.decomposed_scores(*args, backend=backend, **kw)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_opcheck_and_fullgraph_compile():
    p = random_prompt(2, 4, 2, 33, 8, pads=[0, 5], layout="mixed")
    args = (p.q[:, :, -7:], p.k, p.is_image, 1.0, 8**-0.5, p.key_padding, None)
    torch.library.opcheck(torch.ops.csp_inductor.decomposed_scores.default, args)
    torch.library.opcheck(torch.ops.csp_inductor.n_softmax.default, (p.q, 1.0, -1))
    compiled = torch.compile(csp_inductor.decomposed_scores, fullgraph=True)
    out = compiled(p.q[:, :, -7:], p.k, p.is_image, key_padding=p.key_padding)
    eager = csp_inductor.decomposed_scores(
        p.q[:, :, -7:], p.k, p.is_image, key_padding=p.key_padding
    )
    torch.testing.assert_close(out, eager)


def test_extra_memory_at_16k_is_far_below_a_dense_score_matrix():
    """Peak RSS growth of one scoring call at L = 16384, 8 query heads, W = 1638, measured in a
    fresh process (inputs allocated and touched before the baseline is read)."""
    script = textwrap.dedent(
        """
        import resource, torch, csp_inductor
        torch.manual_seed(0)
        L, W = 16384, 1638
        q = torch.randn(1, 8, W, 128); k = torch.randn(1, 2, L, 128)
        img = torch.rand(1, L) < 0.8
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        csp_inductor.decomposed_scores(q, k, img)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) * 1024)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    extra = int(out.stdout.split()[-1])
    dense = 8 * 16384 * 16384 * 4  # one [H, L, L] fp32 tensor: 8 GiB
    print(
        f"scoring extra peak RSS at L=16384: {extra / 2**20:.1f} MiB vs dense {dense / 2**30} GiB"
    )
    assert extra < dense / 40
