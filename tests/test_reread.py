"""Question-agnostic scoring: the prompt re-read after the prefill and scored by the attention
the re-read gives it (``CSP(scoring="reconstruct")``, ``KVzip``), against a reference built
from transformers' own eager attention weights."""

from dataclasses import dataclass

import pytest
import torch

import csp_inductor
from csp_inductor import CSP, KVzip, Oracle
from csp_inductor.allocation import attention_density
from csp_inductor.compat import LinearAttentionLayer
from csp_inductor.policies import Reconstruction
from csp_inductor.scoring import n_softmax_torch
from csp_inductor.testing import BOS_ID, IMAGE_ID, tiny_inputs, tiny_model


@dataclass(frozen=True)
class ShortChunks(CSP):
    """CSP re-reading 48 tokens at a time (several chunks on the tiny prompts)."""

    @property
    def reconstruction(self):
        return Reconstruction(chunk=48)


POLICIES = [
    KVzip(budget=0.3, window_ratio=0.05),
    CSP(budget=0.3, window_ratio=0.05, n=0.0, scoring="reconstruct"),
    ShortChunks(budget=0.3, window_ratio=0.05, n=0.0, cross_ratio=0.3, scoring="reconstruct"),
]


def _decoder_embeds(model, inputs) -> torch.Tensor:
    seen = {}

    def hook(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"]

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    return seen["embeds"]


def reference_kept(policy, inputs) -> list[torch.Tensor]:
    """Per layer, the kept positions (kv_heads, K) of a one-row prompt: each chunk re-read by
    an uncached eager forward of prompt + <bos> + chunk, its attention weights over the prompt
    reduced by max over the chunk's queries and each KV head's query heads, per modality."""
    model = tiny_model("llava")
    model.set_attn_implementation("eager")
    decoder = model.model.language_model
    embeds = _decoder_embeds(model, inputs)
    is_image = inputs["input_ids"][0] == IMAGE_ID
    length = embeds.shape[1]
    sep = decoder.embed_tokens(torch.tensor([[BOS_ID]]))
    heads = model.config.text_config.num_key_value_heads
    scores = None
    for lo in range(0, length, policy.reconstruction.chunk):
        chunk = embeds[:, lo : lo + policy.reconstruction.chunk]
        with torch.no_grad():
            out = decoder(inputs_embeds=torch.cat([embeds, sep, chunk], 1), output_attentions=True)
        q_image = is_image[lo : lo + chunk.shape[1]]
        chunk_scores = []
        for att in out.attentions:  # (1, q_heads, T, T)
            probs = att[0, :, length + 1 :, :length].reshape(heads, -1, chunk.shape[1], length)
            by_image = (
                probs[:, :, q_image].amax(dim=(1, 2)) if q_image.any() else 0 * probs[:, 0, 0]
            )
            by_text = probs[:, :, ~q_image].amax(dim=(1, 2))
            self_ = torch.where(is_image, by_image, by_text)
            cross = torch.where(is_image, by_text, by_image)
            chunk_scores.append(torch.stack([self_, cross], dim=1))
        scores = chunk_scores if scores is None else list(map(torch.maximum, scores, chunk_scores))
    zeros = torch.zeros(1, heads, length, 8)
    counts = [None] * len(scores)  # each layer's count, where the layers keep their own
    if policy.layer_rule != "uniform":
        density = [attention_density(s[None], None).item() for s in scores]
        counts = [[n] for n in policy.layer_counts(length, len(scores), density)]
    return [
        policy.select(zeros, zeros, is_image[None], window_scores=s[None], kept=n)[0]
        for s, n in zip(scores, counts, strict=True)
    ]


LAYERED = [
    KVzip(budget=0.3, window_ratio=0.05, layers="adaptive"),
    CSP(budget=0.3, window_ratio=0.05, n=0.0, scoring="reconstruct", layers="adaptive"),
    CSP(budget=0.3, window_ratio=0.05, n=0.0, scoring="reconstruct", layers="pyramid"),
]


@pytest.mark.parametrize(
    "policy", POLICIES + LAYERED, ids=lambda p: f"{p.name}-{p.reconstruction.chunk}-{p.layers}"
)
def test_reread_keeps_what_the_reference_keeps(policy):
    """Each layer's kept positions (its own count, where the layers share the budget by the
    re-read's densities or the pyramid) equal the reference's; each is given back to them."""
    model = tiny_model("llava")
    inputs = tiny_inputs(model, "llava", seed=3)
    want = reference_kept(policy, inputs)
    csp_inductor.compile(model, policy, compile=False)
    backend = model.csp_backend
    cache = backend.new_cache(8)
    with torch.no_grad():
        model(**inputs, **{backend.cache_arg: cache})
    length = inputs["input_ids"].shape[1]
    kept = policy.budget_for(length).kept
    counts = [int(layer.lengths[0]) for layer in cache.pruned]
    assert sum(counts) == len(counts) * kept and cache.turns[0] == ([length], [kept])
    if policy.layer_rule == "uniform":
        assert cache.rows == [kept] and counts == [kept] * len(counts)
    else:
        assert cache.layer_rows == [[n] for n in counts]
    for layer, expected, held in zip(cache.pruned, want, counts, strict=True):
        assert layer.positions[0, :, :held].tolist() == expected.tolist()
        assert (layer.positions[0, :, held:] == -1).all()  # given back: kept + decode room
        assert layer.keys.shape[2] == held + 8


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_rows_keep_what_they_keep_alone(side):
    policy = POLICIES[2]
    model = tiny_model("llava")
    csp_inductor.compile(model, policy, compile=False)
    backend = model.csp_backend
    batch = tiny_inputs(model, "llava", batch=2, seed=5, pads=[0, 11])
    if side == "right":  # row 1's padding moved after its tokens
        for name in ("input_ids", "attention_mask"):
            batch[name][1] = batch[name][1].roll(-11)
    cache = backend.new_cache(8)
    with torch.no_grad():
        model(**batch, **{backend.cache_arg: cache})
    images = batch["pixel_values"].shape[0] // 2
    for row in range(2):
        real = batch["attention_mask"][row].bool()
        alone = {
            "input_ids": batch["input_ids"][row, real][None],
            "attention_mask": batch["attention_mask"][row, real][None],
            "pixel_values": batch["pixel_values"][row * images : (row + 1) * images],
        }
        single = backend.new_cache(8)
        with torch.no_grad():
            model(**alone, **{backend.cache_arg: single})
        kept = single.rows[0]
        assert cache.rows[row] == kept
        before = int(real.int().argmax())  # stored positions count the padding before a row
        for got, want in zip(cache.pruned, single.pruned, strict=True):
            shifted = got.positions[row, :, :kept] - before
            assert shifted.tolist() == want.positions[0, :, :kept].tolist()
            torch.testing.assert_close(got.values[row, :, :kept], want.values[0, :, :kept])


def test_compiled_reread_equals_eager_and_generates():
    policy = CSP(budget=0.3, window_ratio=0.05, scoring="reconstruct")
    inputs = tiny_inputs(tiny_model("llava"), "llava", batch=2, seed=7, pads=[0, 5])
    runs = {}
    for compiled in (False, True):
        model = tiny_model("llava")
        csp_inductor.compile(model, policy, compile=compiled)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        cache = model.csp_backend.cache
        runs[compiled] = (out, [layer.positions.clone() for layer in cache.pruned], cache.rows)
        if compiled:
            assert model.csp_backend.fallback is None
            assert model.csp_backend.graphs <= 3  # prompt, re-read chunk, decode step
    assert runs[True][2] == runs[False][2]
    for got, want in zip(runs[True][1], runs[False][1], strict=True):
        assert torch.equal(got, want)
    assert runs[True][0].tolist() == runs[False][0].tolist()


def test_keep_all_budget_does_not_reread_and_is_exact():
    model = tiny_model("llava")
    inputs = tiny_inputs(model, "llava", seed=1)
    with torch.no_grad():
        want = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    csp_inductor.compile(model, KVzip(budget=1.0, window_ratio=0.1), compile=False)
    with torch.no_grad():
        got = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert got.tolist() == want.tolist()
    cache = model.csp_backend.cache
    assert cache.kept_prompt == [inputs["input_ids"].shape[1]]
    assert cache.pruned[0].images is None  # allocated for a re-read only


@pytest.mark.parametrize("reduce_max", [True, False])
@pytest.mark.parametrize("n", [0.0, 1.0])
def test_reconstruct_scores_op_against_a_dense_loop(reduce_max, n):
    gen = torch.Generator().manual_seed(0)
    b, hkv, group, t, d, capacity = 2, 2, 2, 5, 8, 16
    lengths = torch.tensor([7, 9])
    keys = torch.randn(b, hkv, capacity, d, generator=gen)
    query = torch.randn(b, hkv * group, t, d, generator=gen)
    images = torch.rand(b, hkv, capacity, generator=gen) < 0.5
    q_image = torch.rand(b, t, generator=gen) < 0.5
    scored = torch.tensor([[False, True, True, True, True], [False, False, True, True, True]])
    hidden = torch.zeros(b, capacity, dtype=torch.bool)
    hidden[1, 9] = True  # row 1's first chunk slot is padding
    start = torch.rand(b, hkv, 2, capacity, generator=gen)
    got = start.clone()
    torch.ops.csp_inductor.reconstruct_scores_(
        got, query, keys, images, lengths, hidden, scored, q_image, n, 0.5, reduce_max, 2
    )
    want = start.clone()
    for row in range(b):
        n_held = int(lengths[row])
        for h in range(hkv):
            for slot in range(n_held):
                picked = {True: [], False: []}  # by the query's modality
                for g in range(group):
                    for i in range(t):
                        if not scored[row, i]:
                            continue
                        sees = [s for s in range(n_held)]
                        sees += [n_held + j for j in range(i + 1) if not hidden[row, n_held + j]]
                        logits = keys[row, h, sees] @ query[row, h * group + g, i] * 0.5
                        p = n_softmax_torch(logits, n, dim=0)[sees.index(slot)]
                        picked[bool(q_image[row, i])].append(float(p))
                fold = max if reduce_max else sum
                same = picked[bool(images[row, h, slot])]
                other = picked[not images[row, h, slot]]
                for channel, values in ((0, same), (1, other)):
                    value = fold(values) if values else 0.0
                    old = float(want[row, h, channel, slot])
                    want[row, h, channel, slot] = max(old, value) if reduce_max else old + value
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_oracle_keeps_the_given_positions_then_the_newest():
    k = torch.zeros(2, 2, 20, 4)
    is_image = torch.zeros(2, 20, dtype=torch.bool)
    padding = torch.zeros(2, 20, dtype=torch.bool)
    padding[1, :4] = True
    oracle = Oracle(budget=0.3, window_ratio=0.1, positions=((0, 5), (1, 2)))
    kept = oracle.select(k, k, is_image, padding)
    assert kept[0, 0].tolist() == [0, 5, 16, 17, 18, 19]  # 20 tokens: k = 4, recent = 2
    assert kept[1, 0].tolist() == [5, 6, 18, 19, -1, -1]  # 16 real tokens from 4: k = 3, recent 1
    with pytest.raises(ValueError, match="positions to keep for each of the batch's 2 rows"):
        Oracle(budget=0.3).select(k, k, is_image)
    with pytest.raises(ValueError, match=r"row 1 must be in \[0, 16\)"):
        Oracle(budget=0.3, positions=((0,), (16,))).select(k, k, is_image, padding)


def test_reread_is_refused_where_it_cannot_run():
    model = tiny_model("llava")
    with pytest.raises(ValueError, match=r"scores the prompt by re-reading it.*max_cache_tokens"):
        csp_inductor.compile(model, KVzip(0.2), compile=False, max_cache_tokens=512)
    with pytest.raises(ValueError, match=r"scoring must be one of \('window', 'reconstruct'\)"):
        CSP(scoring="question")
    assert KVzip().window_ratio == CSP(scoring="reconstruct").window_ratio == 0.01
    assert CSP().window_ratio == 0.1


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "gemma3", "llama"])
def test_flex_reread_keeps_what_sdpa_keeps(family):
    policy = CSP(budget=0.3, window_ratio=0.05, scoring="reconstruct")
    kept = {}
    for kernel in ("sdpa", "flex"):
        model = tiny_model(family)
        inputs = tiny_inputs(model, family, batch=2, seed=1, pads=[0, 3])
        csp_inductor.compile(model, policy, compile=False, kernel=kernel)
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=2, do_sample=False)
        cache = model.csp_backend.cache
        assert all(k < n for k, n in zip(cache.kept_prompt, cache.turns[0][0], strict=True))
        kept[kernel] = [layer.positions[:, :, : min(cache.kept_prompt)] for layer in cache.pruned]
    for got, want in zip(kept["flex"], kept["sdpa"], strict=True):
        assert torch.equal(got, want)


def test_a_conversation_continues_a_reread_cache_past_its_room():
    """The re-read prompt's cache gives its buffers back, then grows for a long turn."""
    model = tiny_model("llava")
    inputs = tiny_inputs(model, "llava", batch=2, seed=2, pads=[0, 4])
    csp_inductor.compile(model, CSP(0.3, window_ratio=0.05, scoring="reconstruct"), compile=False)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
        cache = model.csp_backend.cache
        room = cache.room()
        turn = torch.randint(3, 90, (2, room + 20), generator=torch.Generator().manual_seed(0))
        ids = torch.cat([out, turn], dim=1)
        mask = torch.cat([inputs["attention_mask"], torch.ones(2, ids.shape[1] - 98)], dim=1)
        again = model.generate(
            input_ids=ids, attention_mask=mask.long(), past_key_values=cache, max_new_tokens=2,
            do_sample=False,
        )  # fmt: skip
    assert again.shape[1] == ids.shape[1] + 2
    assert (
        len(cache.turns) == 2 and cache.pruned[0].images.shape[2] == cache.pruned[0].keys.shape[2]
    )


def test_reread_leaves_the_null_slot_empty():
    model = tiny_model("llava")
    inputs = tiny_inputs(model, "llava", seed=4)
    policy = KVzip(budget=0.3, window_ratio=0.05)
    csp_inductor.compile(model, policy, compile=False, decode_softmax_n=1.0)
    with torch.no_grad():
        model(**inputs, **{model.csp_backend.cache_arg: model.csp_backend.new_cache(8)})
    for layer in model.csp_backend.cache.pruned:
        assert not layer.keys[:, :, -1].any() and not layer.values[:, :, -1].any()


def test_generate_and_a_forward_reread_alike_on_mrope():
    """generate passes Qwen2-VL four position rows (text first), a forward three: the chunks
    follow the same position either way."""
    policy = CSP(budget=0.3, window_ratio=0.05, scoring="reconstruct")
    model = tiny_model("qwen2_vl")
    inputs = tiny_inputs(model, "qwen2_vl", seed=2)
    csp_inductor.compile(model, policy, compile=False)
    backend = model.csp_backend
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
        by_generate = [layer.positions.clone() for layer in backend.cache.pruned]
        model(**inputs, **{backend.cache_arg: backend.new_cache(8)})
    kept = backend.cache.kept_prompt[0]
    for got, want in zip(backend.cache.pruned, by_generate, strict=True):
        assert torch.equal(got.positions[:, :, :kept], want[:, :, :kept])


@pytest.mark.skipif(LinearAttentionLayer is None, reason="recurrent layers need transformers 5.3")
def test_recurrent_models_refuse_the_reread():
    from csp_inductor.testing import tiny_family_model

    model = tiny_family_model("lfm2_vl")
    with pytest.raises(ValueError, match="recurrent layers would read the prompt"):
        csp_inductor.compile(model, KVzip(0.2), compile=False)
