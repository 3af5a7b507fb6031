"""Simulated-CUDA tier: the backend's CUDA path, run end to end on a CPU-only machine.

Each test runs the same thing twice: on the CPU (the default SDPA kernel) and on ``cuda``
tensors under :class:`SimulatedCuda` (the FlexAttention kernel, chosen for CUDA, with fake
tensors that carry real CPU values; see ``simulated_cuda.py``). A tensor the backend creates on
the wrong device, a shape or dtype its fake implementations get wrong, or a step the CUDA path
cannot take fails here; the results must equal the CPU run's.

Inductor cannot generate code for a GPU it cannot query, so the compiled test compiles with
``aot_eager``: the graphs Dynamo and AOTAutograd trace (those Inductor would compile) run
operation by operation. The Triton kernels are not run here (``test_kernels.py`` runs them in
Triton's interpreter, ``test_aot.py`` compiles them for sm_80/sm_90).
"""

import sys

import pytest
import torch
from simulated_cuda import CUDA, SimulatedCuda, real, register_cuda_device_guard

import csp_inductor
from csp_inductor import CSP, KVzip
from csp_inductor.attention import decode_block_mask
from csp_inductor.testing import IMAGE_ID, TEXT_IDS, tiny_inputs, tiny_model

pytestmark = [
    pytest.mark.skipif(
        torch.cuda.is_available(), reason="a machine with CUDA runs the GPU tier (test_gpu.py)"
    ),
    # eager flex runs unfused (on the CPU values), as it would eagerly on a GPU
    pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile"),
]

NEW_TOKENS = 4


@pytest.fixture(scope="module", autouse=True)
def cuda_guard(one_thread, tmp_path_factory):
    register_cuda_device_guard(tmp_path_factory.mktemp("cuda_guard"))


def generate(
    model, inputs: dict, new_tokens: int = NEW_TOKENS, **kwargs
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy new tokens and their logits, as CPU tensors."""
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
            output_logits=True, return_dict_in_generate=True, **kwargs,
        )  # fmt: skip
    tokens = real(out.sequences)[:, -new_tokens:]
    return tokens, torch.stack([real(step) for step in out.logits], dim=1)


def on_cpu_and_cuda(family: str, policy, run, **options):
    """``run(model, inputs, device)`` for the tiny ``family`` model compiled with ``options``
    on simulated CUDA, and eagerly on the CPU; returns both results and the CUDA model's
    backend."""
    model = tiny_model(family)
    inputs = tiny_inputs(model, family, batch=2, pads=[0, 5])
    csp_inductor.compile(model, policy, **{**options, "compile": False})  # eager, SDPA
    want = run(model, inputs, torch.device("cpu"))
    csp_inductor.restore(model)
    with SimulatedCuda() as mode:
        mode.to_cuda(model)
        csp_inductor.compile(model, policy, **options)
        got = run(model, mode.to_cuda(inputs), CUDA)
    return want, got, model.csp_backend


def assert_same(got, want) -> None:
    torch.testing.assert_close(got[1], want[1], atol=1e-4, rtol=1e-4)
    assert got[0].tolist() == want[0].tolist()


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "gemma3", "llama"])
def test_generate_on_cuda_uses_flex_and_equals_the_cpu(family):
    want, got, backend = on_cpu_and_cuda(
        family, CSP(0.5), lambda model, inputs, _: generate(model, inputs), compile=False
    )
    assert backend.kernel == "flex"
    assert_same(got, want)
    layer = backend.cache.pruned[0]
    assert {t.device for t in layer.buffers() if t is not None} == {CUDA}
    assert backend.cache.lengths.device == CUDA
    assert backend.block_masks, "decode steps used no flex block mask"
    for mask in backend.block_masks.values():
        assert mask.kv_num_blocks.device == CUDA and mask.kv_indices.device == CUDA


def forwards(model, inputs: dict, device) -> list[torch.Tensor]:
    """A prefill, steps of 3 tokens (as assisted decoding verifies candidates), 1 and 80
    tokens, the last past the cache's room (flex rounds it to whole blocks), so it grows, and
    one more: every step's logits."""
    backend = model.csp_backend
    cache = backend.new_cache(decode_capacity=2)
    gen = torch.Generator().manual_seed(11)
    logits = []
    with torch.no_grad():
        out = model(**inputs, past_key_values=cache)
        logits.append(real(out.logits[:, -1]))
        capacity = cache.pruned[0].keys.shape[2]
        mask = inputs["attention_mask"]
        for width in (3, 1, 80, 1):
            ids = torch.randint(*TEXT_IDS, (2, width), generator=gen).to(device)
            mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
            out = model(input_ids=ids, attention_mask=mask, past_key_values=cache)
            logits.append(real(out.logits))
    assert cache.pruned[0].keys.shape[2] > capacity, "the steps did not grow the cache"
    return logits


@pytest.mark.parametrize(
    "policy", [CSP(0.5), CSP(0.5, layers="pyramid"), CSP(0.5, layers="adaptive")], ids=repr
)
def test_multi_token_steps_and_cache_growth_on_cuda(policy):
    want, got, backend = on_cpu_and_cuda("llava", policy, forwards, compile=False)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
    assert {key[0] for key in backend.block_masks} == {1}  # rebuilt after the growth
    if policy.layer_rule != "uniform":  # each layer its own count and mask
        if policy.layer_rule == "pyramid":
            assert len({int(layer.lengths[0]) for layer in backend.cache.pruned}) > 1
        layers = {layer.index for layer in backend.cache.pruned}
        assert {key[1] for key in backend.block_masks} == layers


def test_compiled_generate_on_cuda_traces_whole_graphs(monkeypatch):
    compiled = sys.modules["csp_inductor.backend.compiled_forward"].CompiledForward

    def aot_eager(self, graph, example_inputs):
        self.graphs += 1
        return torch._dynamo.lookup_backend("aot_eager")(graph, example_inputs)

    monkeypatch.setattr(compiled, "_inductor", aot_eager)
    want, got, backend = on_cpu_and_cuda(
        "llava", CSP(0.2), lambda model, inputs, _: generate(model, inputs)
    )
    assert backend.fallback is None
    assert 1 <= backend.graphs <= 3
    assert_same(got, want)


def conversation(model, inputs: dict, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The prompt's answer, then a second turn (rows of different lengths, one with an image)
    on the same cache."""
    first = generate(model, inputs)
    cache = model.csp_backend.cache
    turn = torch.tensor([[5, 6, IMAGE_ID, *[IMAGE_ID] * 15, 7], [0] * 10 + [8] * 9])
    turn_mask = torch.tensor([[1] * 19, [0] * 10 + [1] * 9])
    history = torch.cat([real(inputs["input_ids"]), first[0]], 1)
    mask = torch.cat([real(inputs["attention_mask"]), torch.ones_like(first[0])], 1)
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    second = {
        "input_ids": torch.cat([history, turn], 1).to(device),
        "attention_mask": torch.cat([mask, turn_mask], 1).to(device),
        "pixel_values": pixels.to(device),
    }
    return [first, generate(model, second, past_key_values=cache)]


@pytest.mark.parametrize(
    "policy", [CSP(0.3, scoring="reconstruct"), KVzip(0.3)], ids=["csp-reconstruct", "kvzip"]
)
def test_reread_and_a_second_turn_on_cuda(policy):
    want, got, _ = on_cpu_and_cuda("llava", policy, conversation, compile=False)
    for g, w in zip(got, want, strict=True):
        assert_same(g, w)


def test_bounded_cache_reprunes_on_cuda():
    def run(model, inputs, _):
        return generate(model, inputs, new_tokens=12)

    want, got, backend = on_cpu_and_cuda("llava", CSP(0.5), run, compile=False, max_cache_tokens=56)
    assert backend.cache.reprunes >= 1
    assert_same(got, want)


def test_text_model_with_inputs_embeds_on_cuda():
    def run(model, inputs, _):
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        return generate(
            model, {"inputs_embeds": embeds, "attention_mask": inputs["attention_mask"]}
        )

    want, got, _ = on_cpu_and_cuda("llama", CSP(0.5), run, compile=False)
    assert_same(got, want)


def test_decode_block_masks_are_built_on_the_queries_device():
    with SimulatedCuda():
        lengths = torch.tensor([5, 9], device=CUDA)
        positions = torch.arange(16, device=CUDA).repeat(2, 2, 1)
        seen = torch.tensor(20, device=CUDA)
        for window, q_len in ((None, 1), (8, 3)):
            mask = decode_block_mask(lengths, positions, seen, window, q_heads=4, q_len=q_len)
            assert mask.kv_num_blocks.device == CUDA and mask.kv_indices.device == CUDA
