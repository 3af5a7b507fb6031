"""The Triton kernels against the fp64 reference, on CPU under Triton's interpreter.

The interpreter runs each program in Python (about a second per call at seq=255 with a few
heads), so the cases below cover each axis once rather than the full cross product:
seq 67/97/255, W 9/13/31 (and W = seq), GQA groups 1/2/4, left padding, text/image/mixed
windows, ``window_mask``, n = 0/1/3, fp32/bf16/fp16, head_dim 16..96 (80 and 96 padded),
non-contiguous views and large logits. With a CUDA device the same cases run the compiled
kernels; the GPU tier (tests/test_gpu.py) repeats them at realistic sizes.
"""

import math

import pytest
import torch

import csp_inductor
from csp_inductor import reference
from csp_inductor.testing import random_prompt

pytest.importorskip("triton", reason="the kernels need Triton (pip install '.[triton]')")
scores_kernel = pytest.importorskip("csp_inductor.kernels.decomposed_scores")
softmax_kernel = pytest.importorskip("csp_inductor.kernels.n_softmax")
decomposed_scores_triton = scores_kernel.decomposed_scores_triton
n_softmax_triton = softmax_kernel.n_softmax_triton

# conftest.py selects the interpreter only without CUDA; with CUDA the kernels run compiled
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# The reference sees the same rounded inputs in fp64, so only the kernels' fp32 arithmetic
# differs: products of fp16/bf16 values are exact in fp32, hence similar bounds for all inputs.
SCORE_TOL = {  # dtype: (atol, rtol)
    torch.float32: (2e-6, 1e-5),
    torch.float16: (2e-6, 1e-5),
    torch.bfloat16: (2e-6, 1e-5),
}
# n_softmax returns x's dtype: one rounding of the output (the interpreter truncates to bf16).
SOFTMAX_TOL = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-7, 1e-5),
    torch.float16: (1e-5, 2e-3),
    torch.bfloat16: (1e-4, 1.6e-2),
}

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# id: (batch, q_heads, kv_heads, seq, W, head_dim, dtype, n, pads, layout, window_mask, scale)
SCORE_CASES = {
    "L67-W9-mha-fp32-mixed": (1, 2, 2, 67, 9, 16, F32, 1.0, None, "mixed", False, None),
    "L97-W13-gqa2-bf16-pad-n0": (2, 4, 2, 97, 13, 32, BF16, 0.0, [0, 20], "blocks", False, None),
    "L255-W31-gqa4-fp16-image-wmask": (1, 4, 1, 255, 31, 64, F16, 3.0, None, "image", True, None),
    "L97-W31-d80-fp32-text-pad-wmask": (2, 2, 1, 97, 31, 80, F32, 3.0, [5, 0], "text", True, None),
    "L67-W13-gqa4-bf16-wmask": (1, 8, 2, 67, 13, 16, BF16, 1.0, None, "mixed", True, None),
    "L255-W9-gqa2-d96-fp16-pad": (2, 4, 2, 255, 9, 96, F16, 0.0, [100, 3], "blocks", False, None),
    "W=L-window-in-padding": (2, 2, 1, 67, 67, 32, F32, 1.0, [40, 0], "mixed", True, None),
    "L97-W13-large-logits": (1, 2, 1, 97, 13, 64, F32, 1.0, None, "blocks", False, 1.0),
    "L255-W31-gqa4-d128-bf16-pad-wmask": (
        2,
        8,
        2,
        255,
        31,
        128,
        BF16,
        3.0,
        [0, 60],
        "mixed",
        True,
        None,
    ),
    "L67-W9-batch3-fp16-blocks": (3, 2, 1, 67, 9, 16, F16, 1.0, [0, 1, 2], "blocks", False, None),
}


def _case(batch, q_heads, kv_heads, seq, window, head_dim, dtype, pads, layout, wmask, seed=0):
    p = random_prompt(
        batch,
        q_heads,
        kv_heads,
        seq,
        head_dim,
        pads=pads,
        layout=layout,
        dtype=dtype,
        seed=seed,
        device=DEVICE,
    )
    window_mask = None
    if wmask:
        gen = torch.Generator().manual_seed(seed + 1)
        window_mask = (torch.rand(batch, window, generator=gen) < 0.7).to(DEVICE)
    return p.q[:, :, seq - window :], p.k, p.is_image, p.key_padding, window_mask


def _assert_scores_close(out, q_window, k, is_image, n, scale, key_padding, window_mask):
    ref = reference.decomposed_scores(
        q_window.double(),
        k.double(),
        is_image,
        n=n,
        scale=scale,
        key_padding=key_padding,
        window_mask=window_mask,
    )
    assert out.shape == ref.shape and out.dtype == torch.float32
    atol, rtol = SCORE_TOL[q_window.dtype]
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("case", list(SCORE_CASES.values()), ids=list(SCORE_CASES))
def test_decomposed_scores_kernel_matches_reference(case):
    batch, hq, hkv, seq, window, d, dtype, n, pads, layout, wmask, scale = case
    q_window, k, is_image, key_padding, window_mask = _case(
        batch, hq, hkv, seq, window, d, dtype, pads, layout, wmask
    )
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = decomposed_scores_triton(q_window, k, is_image, n, scale, key_padding, window_mask)
    _assert_scores_close(out, q_window, k, is_image, n, scale, key_padding, window_mask)
    # rows that are padding, masked out or invisible contribute nothing: nothing is NaN
    assert out.isfinite().all()


def _prefill_lse(q, k, scale, key_padding):
    """The log-sum-exp of causal prefill rows as FlexAttention returns it: padding keys hidden
    from real queries, padding queries see them (their rows stay finite)."""
    group = q.shape[1] // k.shape[1]
    logits = (q.double() @ k.double().repeat_interleave(group, 1).transpose(-1, -2)) * scale
    seq = k.shape[2]
    q_pos = torch.arange(seq - q.shape[2], seq, device=q.device)
    allowed = (torch.arange(seq, device=q.device)[None, :] <= q_pos[:, None])[None]
    if key_padding is not None:
        rows = key_padding[:, seq - q.shape[2] :]
        allowed = allowed & (~key_padding[:, None, :] | rows[:, :, None])
    return logits.masked_fill(~allowed[:, None], -math.inf).logsumexp(-1).float()


@pytest.mark.parametrize(
    "case",
    [SCORE_CASES["L97-W31-d80-fp32-text-pad-wmask"], SCORE_CASES["L67-W13-gqa4-bf16-wmask"]],
    ids=["pad-wmask-n3", "gqa4-bf16"],
)
def test_decomposed_scores_kernel_from_the_attentions_lse(case):
    """Given FlexAttention's log-sum-exp, pass 1 is skipped; with ``columns`` only the keys
    before it are scored (the rest is 0)."""
    batch, hq, hkv, seq, window, d, dtype, n, pads, layout, wmask = case[:-1]
    q_window, k, is_image, key_padding, window_mask = _case(
        batch, hq, hkv, seq, window, d, dtype, pads, layout, wmask
    )
    scale, columns = d**-0.5, seq - window - 3
    lse = _prefill_lse(q_window, k, scale, key_padding)
    out = decomposed_scores_triton(
        q_window, k, is_image, n, scale, key_padding, window_mask, lse=lse, columns=columns
    )
    full = decomposed_scores_triton(q_window, k, is_image, n, scale, key_padding, window_mask)
    atol, rtol = SCORE_TOL[dtype]
    torch.testing.assert_close(out[..., :columns], full[..., :columns], atol=atol, rtol=rtol)
    assert not out[..., columns:].any()


def test_decomposed_scores_kernel_takes_strided_views():
    # k stored (batch, seq, kv_heads, head_dim) as models keep it; q_window a slice of all q
    gen = torch.Generator().manual_seed(3)
    batch, hq, hkv, seq, window, d = 2, 4, 2, 67, 9, 32
    k = torch.randn(batch, seq, hkv, d, generator=gen).to(DEVICE).transpose(1, 2)
    q = torch.randn(batch, seq, hq, d, generator=gen).to(DEVICE).transpose(1, 2)
    q_window = q[:, :, seq - window :]
    is_image = (torch.rand(batch, 2 * seq, generator=gen) < 0.5).to(DEVICE)[:, ::2]
    key_padding = (torch.arange(seq)[None, :] < torch.tensor([[0], [7]])).to(DEVICE)
    assert not (k.is_contiguous() or q_window.is_contiguous() or is_image.is_contiguous())
    out = decomposed_scores_triton(q_window, k, is_image, 1.0, d**-0.5, key_padding, None)
    _assert_scores_close(out, q_window, k, is_image, 1.0, d**-0.5, key_padding, None)


def test_public_triton_backend_goes_through_the_launcher(monkeypatch):
    calls = []

    def spy(*args):
        calls.append(args)
        return decomposed_scores_triton(*args)

    monkeypatch.setattr(scores_kernel, "decomposed_scores_triton", spy)
    q_window, k, is_image, key_padding, _ = _case(1, 2, 1, 67, 9, 16, F32, [4], "mixed", False)
    out = csp_inductor.decomposed_scores(
        q_window, k, is_image, n=1.0, key_padding=key_padding, backend="triton"
    )
    assert len(calls) == 1
    torch.testing.assert_close(
        out, csp_inductor.decomposed_scores(q_window, k, is_image, key_padding=key_padding)
    )


def test_opcheck_decomposed_scores_op():
    q_window, k, is_image, key_padding, window_mask = _case(
        2, 4, 2, 67, 9, 16, F32, [0, 5], "mixed", True
    )
    args = (q_window, k, is_image, 1.0, 0.25, key_padding, window_mask)
    torch.library.opcheck(torch.ops.csp_inductor.decomposed_scores.default, args)
    torch.library.opcheck(
        torch.ops.csp_inductor.n_softmax.default, (torch.randn(3, 67, device=DEVICE), 1.0, -1)
    )


@pytest.mark.parametrize("head_dim", [320, 512])
def test_bad_head_dim_is_rejected_with_the_allowed_values(head_dim):
    q_window = torch.zeros(1, 1, 4, head_dim)
    k = torch.zeros(1, 1, 8, head_dim)
    is_image = torch.zeros(1, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match=rf"head_dim={head_dim}.*allowed.*1\.\.256"):
        decomposed_scores_triton(q_window, k, is_image, 1.0, 1.0, None, None)


def test_launcher_errors_name_the_numbers(monkeypatch):
    img = torch.zeros(1, 8, dtype=torch.bool)
    q, k = torch.zeros(1, 2, 4, 16), torch.zeros(1, 1, 8, 16)
    with pytest.raises(ValueError, match="share a dtype"):
        decomposed_scores_triton(q.half(), k, img, 1.0, 1.0, None, None)
    with pytest.raises(ValueError, match=r"window_mask must be a bool tensor of shape \(1, 4\)"):
        decomposed_scores_triton(q, k, img, 1.0, 1.0, None, torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="batch \\* q_heads = 1 \\* 65536 = 65536 exceeds"):
        decomposed_scores_triton(torch.zeros(1, 65536, 1, 16), k, img, 1.0, 1.0, None, None)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="need CUDA tensors"):
        decomposed_scores_triton(q, k, img, 1.0, 1.0, None, None)


# id: (shape, dim, dtype, n, scale of x)
SOFTMAX_CASES = {
    "fp32-last-dim-n1": ((3, 67), -1, torch.float32, 1.0, 4.0),
    "bf16-middle-dim-n3": ((4, 97, 3), 1, torch.bfloat16, 3.0, 4.0),
    "fp16-first-dim-n0": ((255, 2, 5), 0, torch.float16, 0.0, 4.0),
    "fp32-row-longer-than-a-block": ((2, 4100), -1, torch.float32, 1.0, 4.0),
    "fp64-large-n": ((5, 31), -1, torch.float64, 1e6, 30.0),
    "fp32-large-logits": ((3, 13), -1, torch.float32, 1.0, 1000.0),
}


@pytest.mark.parametrize("case", list(SOFTMAX_CASES.values()), ids=list(SOFTMAX_CASES))
def test_n_softmax_kernel_matches_reference(case):
    shape, dim, dtype, n, spread = case
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * spread).to(DEVICE, dtype)
    rows = x.movedim(dim, -1)
    rows[0] = -math.inf  # one fully masked row: zeros, not NaN
    rows[1, ..., :2] = -math.inf
    out = n_softmax_triton(x, n, dim)
    assert out.dtype == dtype and out.shape == x.shape
    ref = reference.n_softmax(x.double(), n=n, dim=dim).nan_to_num(0.0)
    atol, rtol = SOFTMAX_TOL[dtype]
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)
    assert torch.equal(out.movedim(dim, -1)[0], torch.zeros_like(rows[0]))
    torch.testing.assert_close(
        out, csp_inductor.scoring.n_softmax_torch(x, n, dim), atol=atol, rtol=rtol
    )


def test_n_softmax_kernel_takes_strided_and_empty_inputs():
    x = torch.randn(33, 6, device=DEVICE).t()  # rows of 33 with stride 6
    torch.testing.assert_close(
        n_softmax_triton(x, 1.0, -1), reference.n_softmax(x.double(), 1.0).float()
    )
    assert n_softmax_triton(torch.zeros(0, 5, device=DEVICE), 1.0, -1).shape == (0, 5)


def test_autotuning_keys_on_every_compile_time_variant():
    # a config tuned for one variant (no padding, no n-softmax, ...) is not reused for another
    pass1 = set(scores_kernel._window_shift_tuned.keys)
    pass2 = set(scores_kernel._column_sums_tuned.keys)
    assert {"HAS_PAD", "HAS_WMASK", "HAS_N", "BLOCK_D", "group"} <= pass1
    assert {"HAS_PAD", "DOT_FP32", "BLOCK_D", "group"} <= pass2
