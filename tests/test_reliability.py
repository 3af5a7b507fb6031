"""The compiled mode in ordinary use (invariant 10): shapes and policies that vary in one process
share a few graphs, a compiler failure falls back to eager with one warning and the same
results, and the inputs that used to crash (no cache, right padding, a cache implementation,
a report before the first prompt, a policy switch) work."""

import warnings

import pytest
import torch
from torch._dynamo.utils import counters

import csp_inductor
from csp_inductor import CSP, Full, SnapKV
from csp_inductor.backend.compiled_forward import CompiledForward
from csp_inductor.evaluation import haystack as hs
from csp_inductor.testing import (
    TEXT_IDS,
    assert_same_generation,
    greedy,
    tiny_inputs,
    tiny_model,
)

BATCH_SIZES = (1, 2, 3, 4, 5, 6)
IMAGES = (2, 5, 9)  # three prompt lengths (rows of a batch differ by up to two images more)


def haystack_batch(size: int, images: int) -> dict:
    samples = [
        hs.make_sample(hs.TASKS[i % len(hs.TASKS)], 100 * size + i, num_images=images + i % 3)
        for i in range(size)
    ]
    return hs.collate(samples)


@torch.no_grad()
def generate(model, inputs, new: int = 3, **kwargs):
    out = model.generate(
        **inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False,
        pad_token_id=hs.PAD_TOKEN_ID, **kwargs,
    )  # fmt: skip
    if "input_ids" not in inputs:  # given embeddings, generate returns the new tokens only
        return out
    return out[:, inputs["input_ids"].shape[1] :]


@pytest.fixture(scope="module")
def builtin_pair():
    """The built-in model compiled, and through the eager backend (the reference)."""
    compiled = csp_inductor.compile(hs.load_builtin_model(), CSP())
    eager = csp_inductor.compile(hs.load_builtin_model(), CSP(), compile=False)
    yield compiled, eager
    csp_inductor.restore(compiled)
    csp_inductor.restore(eager)


def test_batch_sizes_lengths_and_policies_share_four_graphs(builtin_pair):
    compiled, eager = builtin_pair
    runs = 0
    for policy in (CSP(), SnapKV()):
        compiled.csp_backend.policy = eager.csp_backend.policy = policy
        for size in BATCH_SIZES:
            for images in IMAGES:
                inputs = haystack_batch(size, images)
                assert torch.equal(generate(compiled, inputs), generate(eager, inputs))
                kept = compiled.csp_backend.cache.kept_prompt
                real = inputs["attention_mask"].sum(dim=1).tolist()
                assert kept == [policy.budget_for(n).kept for n in real]
                runs += 1
    backend = compiled.csp_backend
    print(f"{runs} generate calls, {backend.graphs} graphs compiled")
    assert runs == 36 and backend.fallback is None
    # prefill and decode, each for batch 1 and batch > 1 (Dynamo specialises size 1)
    assert 0 < backend.graphs <= 4


def test_bf16_full_cache_compiled_gives_the_unmodified_answers():
    model = hs.load_builtin_model().to(torch.bfloat16)
    samples = [
        hs.make_sample(task, 7 + i, num_images=4 + 3 * i) for task in hs.TASKS for i in (0, 1)
    ]
    inputs = hs.collate(samples)
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    reference = generate(model, inputs, new=4)
    csp_inductor.compile(model, Full())
    ours = generate(model, inputs, new=4)
    assert [hs.decode(r) for r in ours] == [hs.decode(r) for r in reference]
    assert model.csp_backend.fallback is None
    assert model.csp_backend.cache.layers[0].keys.dtype == torch.bfloat16


def test_a_first_prompt_as_long_as_the_hidden_size_leaves_the_prefill_dynamic():
    # Dynamo's duck sizing gave such a prompt's length the hidden dim's symbol, and the
    # weights' matmul then made the first prefill graph static: every later length recompiled
    model = tiny_model("llama")
    eager = csp_inductor.compile(tiny_model("llama"), CSP(), compile=False)
    csp_inductor.compile(model, CSP())
    width = model.config.hidden_size
    for length in (width, width + 37, 2 * width + 5):
        ids = torch.randint(*TEXT_IDS, (1, length), generator=torch.Generator().manual_seed(length))
        inputs = {
            "inputs_embeds": model.get_input_embeddings()(ids).detach(),
            "attention_mask": torch.ones_like(ids),
        }
        assert torch.equal(generate(model, inputs), generate(eager, inputs))
    assert model.csp_backend.graphs == 2  # prefill and decode
    assert model.csp_backend.fallback is None


def test_the_lm_head_of_a_decode_step_is_one_compiled_reduction():
    """Up to 4 fp32 rows the LM head runs as the compiled multiply-and-sum (the same logits
    within 1e-4 and the same tokens as the module's own forward), in one graph of its own; more
    rows, a compiler failure (one warning), Dynamo disabled and ``restore`` give the module's
    own forward back."""
    model = csp_inductor.compile(tiny_model("llava"), CSP())
    eager = csp_inductor.compile(tiny_model("llava"), CSP(), compile=False)
    head = model.csp_backend.lm_head
    rows = []
    compiled = head.compiled

    def spy(hidden, weight, bias):
        rows.append(hidden.shape[0])
        return compiled(hidden, weight, bias)

    head.compiled = spy
    for batch, pads in ((1, None), (4, [0, 3, 5, 9]), (5, [0, 1, 2, 3, 4])):
        rows.clear()
        inputs = tiny_inputs(model, "llava", batch=batch, pads=pads)
        assert_same_generation(greedy(model, inputs, 4), greedy(eager, inputs, 4))
        assert rows == ([batch] * 4 if batch <= 4 else [])  # the prompt's last token, 3 steps
    assert head.graphs == 2  # batch 1 and batch > 1 (Dynamo specialises size 1)

    inputs = tiny_inputs(model, "llava")
    with torch.compiler.set_stance("force_eager"):  # its Python body runs: F.linear
        assert_same_generation(greedy(model, inputs, 4), greedy(eager, inputs, 4))

    def broken(*args):
        raise torch._dynamo.exc.TorchDynamoException("no compiler here")

    head.compiled = broken
    with pytest.warns(RuntimeWarning, match="LM head") as record:
        got = greedy(model, inputs, 4)
    assert sum("LM head" in str(w.message) for w in record) == 1
    assert_same_generation(got, greedy(eager, inputs, 4))
    assert model.csp_backend.head_fallback.startswith("TorchDynamoException")
    csp_inductor.restore(model)
    assert "forward" not in vars(model.lm_head)


def test_a_batch_1_decode_step_streams_its_weights_in_fused_reductions():
    """Every linear layer of the compiled batch-1 decode step is a multiply-and-sum, not a
    matrix product (the prefill's are not: their rows are many); the tokens and logits are
    the eager backend's."""
    model = csp_inductor.compile(tiny_model("llava"), CSP())
    eager = csp_inductor.compile(tiny_model("llava"), CSP(), compile=False)
    inputs = tiny_inputs(model, "llava")
    counters.clear()
    with torch._inductor.config.patch(fx_graph_cache=False):  # (a cache hit skips the passes)
        assert_same_generation(greedy(model, inputs, 4), greedy(eager, inputs, 4))
    layers = model.config.text_config.num_hidden_layers
    decomposed = counters["inductor"]["decompose_mm"] + counters["inductor"]["decompose_addmm"]
    assert decomposed == 7 * layers  # q, k, v, o, gate, up, down


@pytest.fixture
def llava():
    return tiny_model("llava")


def test_recompile_limit_falls_back_to_eager_once_with_the_same_tokens(llava):
    inputs = tiny_inputs(llava, "llava", batch=2, pads=[0, 5])
    eager = csp_inductor.compile(tiny_model("llava"), CSP(), compile=False)
    want = generate(eager, inputs, new=5)
    csp_inductor.compile(llava, CSP())
    # one graph allowed: the prefill compiles, the first decode step hits the limit
    with torch._dynamo.config.patch(recompile_limit=1):
        with pytest.warns(RuntimeWarning, match="runs eagerly from now on") as record:
            got = generate(llava, inputs, new=5)
        assert sum("eagerly" in str(w.message) for w in record) == 1
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # said once, not per call
            again = generate(llava, tiny_inputs(llava, "llava", batch=3, pads=[0, 2, 9]), new=4)
    assert torch.equal(got, want)
    assert again.shape == (3, 4)
    assert llava.csp_backend.fallback.startswith("FailOnRecompileLimitHit")


def test_compiled_flex_serves_a_second_prompt(llava):
    # the flex decoder used to leave transformers' output capturing in its compiled mode, so
    # the vision tower of the next prompt returned no hidden states (IndexError)
    eager = csp_inductor.compile(tiny_model("llava"), CSP(), kernel="flex", compile=False)
    csp_inductor.compile(llava, CSP(), kernel="flex")
    for batch, pads in ((1, None), (3, [0, 3, 7])):
        inputs = tiny_inputs(llava, "llava", batch=batch, pads=pads)
        assert torch.equal(generate(llava, inputs), generate(eager, inputs))
    # On CPU, torch 2.13's Inductor fails to build the batched flex prefill (a C++ compile
    # error): the backend then runs eagerly, so a fallback is allowed here, a crash is not.
    fallback = llava.csp_backend.fallback
    assert fallback is None or fallback.startswith("InductorError: CppCompileError")


def test_a_compiler_error_falls_back_but_a_model_error_is_raised():
    calls = []

    def forward(x):
        calls.append(x)
        if x < 0:
            raise ValueError(f"x must be >= 0, got x={x}")
        return 2 * x

    def broken(*args, **kwargs):
        raise torch._dynamo.exc.InternalTorchDynamoError("simulated compiler failure")

    guarded = CompiledForward(forward, dynamic=True)
    guarded.compiled = broken
    with pytest.raises(ValueError, match="got x=-1"):  # eager's own error, not the compiler's
        guarded(-1)
    assert guarded.failure is None
    with pytest.warns(RuntimeWarning, match="simulated compiler failure"):
        assert guarded(3) == 6
    assert guarded(4) == 8 and calls == [-1, 3, 4]
    assert guarded.failure == "InternalTorchDynamoError: simulated compiler failure"


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_generate_without_a_cache(llava, compiled):
    inputs = tiny_inputs(llava, "llava", batch=2, pads=[0, 4])
    want = generate(llava, inputs, new=4, use_cache=False)
    csp_inductor.compile(llava, CSP(), compile=compiled)
    # no cache: nothing is stored, so nothing is pruned, whatever the policy
    assert torch.equal(generate(llava, inputs, new=4, use_cache=False), want)
    # extra keyword arguments reach the decoder, compiled or not (a call asking for hidden
    # states runs eagerly, and the model stays compiled)
    with torch.no_grad():
        out = llava(**inputs, use_cache=False, output_hidden_states=True)
    assert llava.csp_backend.fallback is None
    csp_inductor.restore(llava)
    with torch.no_grad():
        ref = llava(**inputs, use_cache=False, output_hidden_states=True)
    assert len(out.hidden_states) == len(ref.hidden_states) == 3
    real = inputs["attention_mask"].bool()
    for got, expected in zip(out.hidden_states, ref.hidden_states, strict=True):
        torch.testing.assert_close(got[real], expected[real], atol=1e-4, rtol=1e-4)


def right_padded(inputs: dict, pads: list[int]) -> dict:
    """Left-padded ``inputs`` with each row's padding moved to its end."""
    out = dict(inputs)
    for key in ("input_ids", "attention_mask"):
        rows = [torch.roll(row, -pad) for row, pad in zip(inputs[key], pads, strict=True)]
        out[key] = torch.stack(rows)
    return out


def test_right_padded_forward_prunes_like_left_padding(llava):
    pads = [0, 6, 11]
    left = tiny_inputs(llava, "llava", batch=3, pads=pads)
    right = right_padded(left, pads)
    with torch.no_grad():
        want = llava(**right).logits
        csp_inductor.compile(llava, CSP(), compile=False)
        got = llava(**right).logits
        right_cache = llava.csp_backend.cache
        llava(**left)
        left_cache = llava.csp_backend.cache
    real = right["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)
    assert right_cache.kept_prompt == left_cache.kept_prompt
    assert right_cache.kept_prompt == [
        CSP().budget_for(len(row) - pad).kept
        for row, pad in zip(left["input_ids"], pads, strict=True)
    ]
    shift = torch.tensor(pads)[:, None, None]
    for on_right, on_left in zip(right_cache.layers, left_cache.layers, strict=True):
        kept = on_left.positions >= 0
        assert torch.equal(on_right.positions[kept], (on_left.positions - shift)[kept])
        # values, unlike keys, carry no rotary position: the same tokens, the same values
        torch.testing.assert_close(on_right.values, on_left.values, atol=1e-5, rtol=1e-5)


def test_cache_implementation_is_replaced_by_the_pruned_cache(llava):
    inputs = tiny_inputs(llava, "llava")
    csp_inductor.compile(llava, CSP(), compile=False)
    want = generate(llava, inputs)
    assert torch.equal(generate(llava, inputs, cache_implementation="static"), want)
    llava.generation_config.cache_implementation = "dynamic"
    assert torch.equal(generate(llava, inputs), want)
    assert llava.generation_config.cache_implementation == "dynamic"  # the user's, untouched


def test_reports_before_the_first_prompt_and_policy_assignment(llava):
    csp_inductor.compile(llava, CSP(), compile=False)
    backend = llava.csp_backend
    assert backend.cache.nbytes() == 0 and backend.cache.kept_prompt == []
    inputs = tiny_inputs(llava, "llava")
    length = inputs["input_ids"].shape[1]
    generate(llava, inputs)
    assert backend.cache.kept_prompt == [CSP().budget_for(length).kept]
    backend.policy = SnapKV(budget=0.5)
    generate(llava, inputs)
    assert backend.cache.kept_prompt == [SnapKV(budget=0.5).budget_for(length).kept]
    assert backend.policy == SnapKV(budget=0.5)


def test_text_model_prunes_a_batch_given_as_embeddings():
    model = tiny_model("llama")
    ids = tiny_inputs(model, "llama", batch=2, pads=[0, 5])
    embeds = model.get_input_embeddings()(ids["input_ids"])
    with torch.no_grad():
        want = model(inputs_embeds=embeds, attention_mask=ids["attention_mask"]).logits
        csp_inductor.compile(model, SnapKV(), compile=False)
        got = model(inputs_embeds=embeds, attention_mask=ids["attention_mask"]).logits
    real = ids["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)
    lengths = ids["attention_mask"].sum(dim=1).tolist()
    assert model.csp_backend.cache.kept_prompt == [SnapKV().budget_for(n).kept for n in lengths]
