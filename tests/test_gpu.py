"""GPU tier: the Triton kernels at realistic sizes, op dispatch and compile on CUDA.

Skipped without a CUDA device. The fp64 dense reference at these sizes needs up to ~1 GiB.
"""

import math

import pytest
import torch

import csp_inductor
from csp_inductor import reference
from csp_inductor.testing import random_prompt

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# GPU exp2 is approximate (~2 ulp) and sums run over up to W·group rows, so a little looser
# than the CPU tier; inputs are rounded identically for the fp64 reference.
SCORE_TOL = {  # dtype: (atol, rtol)
    torch.float32: (1e-5, 1e-4),
    torch.float16: (1e-5, 1e-4),
    torch.bfloat16: (1e-5, 1e-4),
}
SOFTMAX_TOL = {
    torch.float32: (1e-7, 1e-5),
    torch.float16: (1e-5, 2e-3),
    torch.bfloat16: (1e-4, 8e-3),
}

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# id: (batch, q_heads, kv_heads, seq, W, head_dim, dtype, n, pads, layout, window_mask)
SCORE_CASES = {
    "llava-7b-L2053": (1, 32, 32, 2053, 205, 128, F16, 1.0, None, "blocks", False),
    "qwen2vl-gqa7-L4099-pad": (2, 28, 4, 4099, 409, 128, BF16, 1.0, [0, 700], "blocks", True),
    "d80-fp32-n3": (1, 32, 32, 1031, 103, 80, F32, 3.0, None, "mixed", False),
    "d64-gqa8-L8191-text-n0": (1, 16, 2, 8191, 819, 64, BF16, 0.0, None, "text", False),
    "d96-image": (1, 32, 32, 2049, 204, 96, F16, 1.0, [0], "image", True),
}


def _case(batch, q_heads, kv_heads, seq, window, head_dim, dtype, pads, layout, wmask):
    p = random_prompt(
        batch,
        q_heads,
        kv_heads,
        seq,
        head_dim,
        pads=pads,
        layout=layout,
        dtype=dtype,
        device="cuda",
    )
    window_mask = None
    if wmask:
        gen = torch.Generator().manual_seed(1)
        window_mask = (torch.rand(batch, window, generator=gen) < 0.7).cuda()
    return p.q[:, :, seq - window :], p.k, p.is_image, p.key_padding, window_mask


def _reference(q_window, k, is_image, n, scale, key_padding, window_mask):
    return reference.decomposed_scores(
        q_window.double(),
        k.double(),
        is_image,
        n=n,
        scale=scale,
        key_padding=key_padding,
        window_mask=window_mask,
    )


@pytest.mark.parametrize("case", list(SCORE_CASES.values()), ids=list(SCORE_CASES))
def test_decomposed_scores_kernel_matches_reference_on_cuda(case):
    from csp_inductor.kernels.decomposed_scores import decomposed_scores_triton

    batch, hq, hkv, seq, window, d, dtype, n, pads, layout, wmask = case
    args = _case(batch, hq, hkv, seq, window, d, dtype, pads, layout, wmask)
    q_window, k, is_image, key_padding, window_mask = args
    scale = 1.0 / math.sqrt(d)
    out = decomposed_scores_triton(q_window, k, is_image, n, scale, key_padding, window_mask)
    ref = _reference(q_window, k, is_image, n, scale, key_padding, window_mask)
    atol, rtol = SCORE_TOL[dtype]
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)
    # the chunked torch path agrees too, and the kernel is deterministic (no atomics)
    torch.testing.assert_close(
        out,
        csp_inductor.decomposed_scores(
            *args[:3], n=n, key_padding=key_padding, window_mask=window_mask, backend="torch"
        ),
        atol=atol,
        rtol=rtol,
    )
    again = decomposed_scores_triton(q_window, k, is_image, n, scale, key_padding, window_mask)
    assert torch.equal(out, again)


@pytest.mark.parametrize(
    "shape, dim, dtype, n",
    [((4, 32, 4099), -1, BF16, 1.0), ((8, 5000), -1, F32, 3.0), ((3, 2053, 7), 1, F16, 0.0)],
)
def test_n_softmax_kernel_matches_reference_on_cuda(shape, dim, dtype, n):
    from csp_inductor.kernels.n_softmax import n_softmax_triton

    x = (torch.randn(shape, device="cuda", dtype=torch.float64) * 4).to(dtype)
    x.movedim(dim, -1)[0] = -math.inf
    out = n_softmax_triton(x, n, dim)
    ref = reference.n_softmax(x.double(), n=n, dim=dim).nan_to_num(0.0)
    atol, rtol = SOFTMAX_TOL[dtype]
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)


def test_registered_ops_dispatch_to_the_kernels_on_cuda(monkeypatch):
    from csp_inductor.kernels import decomposed_scores as scores_module
    from csp_inductor.kernels import n_softmax as softmax_module

    calls = []

    def spy(module, name):
        original = getattr(module, name)

        def wrapped(*args):
            calls.append(name)
            return original(*args)

        monkeypatch.setattr(module, name, wrapped)

    spy(scores_module, "decomposed_scores_triton")
    spy(softmax_module, "n_softmax_triton")
    q_window, k, is_image, key_padding, window_mask = _case(
        2, 8, 2, 515, 51, 64, F16, [0, 9], "blocks", True
    )
    out = csp_inductor.decomposed_scores(
        q_window, k, is_image, key_padding=key_padding, window_mask=window_mask
    )
    csp_inductor.n_softmax(torch.randn(4, 300, device="cuda"), n=1.0)
    assert calls == ["decomposed_scores_triton", "n_softmax_triton"]
    ref = _reference(q_window, k, is_image, 1.0, 64**-0.5, key_padding, window_mask)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-4)
    args = (q_window, k, is_image, 1.0, 64**-0.5, key_padding, window_mask)
    torch.library.opcheck(torch.ops.csp_inductor.decomposed_scores.default, args)
    torch.library.opcheck(
        torch.ops.csp_inductor.n_softmax.default, (torch.randn(3, 67, device="cuda"), 1.0, -1)
    )


def test_compiled_public_function_fullgraph_on_cuda():
    torch._dynamo.reset()
    q_window, k, is_image, key_padding, window_mask = _case(
        2, 8, 2, 1027, 102, 128, BF16, [0, 30], "blocks", True
    )
    compiled = torch.compile(csp_inductor.decomposed_scores, fullgraph=True)
    out = compiled(q_window, k, is_image, n=1.0, key_padding=key_padding, window_mask=window_mask)
    eager = csp_inductor.decomposed_scores(
        q_window, k, is_image, n=1.0, key_padding=key_padding, window_mask=window_mask
    )
    torch.testing.assert_close(out, eager, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("family", ["llava", "gemma3"])
def test_compiled_model_keep_all_is_exact_in_one_graph_per_phase_on_cuda(family):
    # the whole CUDA path: flex prefill and decode, the compaction op, cache growth by generate
    from csp_inductor.testing import (
        assert_same_generation,
        greedy,
        placeholder_inputs,
        tiny_family_model,
    )

    model = tiny_family_model(family).cuda()
    prompts = [
        {k: v.cuda() for k, v in placeholder_inputs(model, 2, [0, 5], seed, n).items()}
        for seed, n in ((0, 96), (1, 120))
    ]
    refs = [greedy(model, inputs, 6) for inputs in prompts]
    csp_inductor.compile(model, csp_inductor.Full())
    assert model.csp_backend.kernel == "flex"
    assert_same_generation(greedy(model, prompts[0], 6), refs[0])
    graphs = model.csp_backend.graphs
    assert_same_generation(greedy(model, prompts[1], 6), refs[1])
    assert model.csp_backend.graphs == graphs and model.csp_backend.fallback is None
