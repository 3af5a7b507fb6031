"""Conversations on the pruned cache: later turns continue it through ``generate`` (the
transformers convention: the whole history plus the new turn, and the previous call's cache)."""

import inspect
import math

import pytest
import torch
from torch import Tensor
from transformers import AttentionInterface

import csp_inductor
from csp_inductor import CSP, Full, SnapKV
from csp_inductor.testing import (
    IMAGE_ID,
    PAD_ID,
    TEXT_IDS,
    known_model_types,
    tiny_family_model,
    tiny_inputs,
    tiny_model,
)

NEW_TOKENS = 4


def turn_ids(
    lengths: list[int], seed: int, image: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """A turn's ids and mask: text per row (``lengths[b]`` tokens, left-padded to the longest),
    with one LLaVA image (16 placeholders) in the middle when ``image``."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        ids = torch.randint(*TEXT_IDS, (n,), generator=gen)
        if image:
            ids = torch.cat([ids[: n // 2], torch.full((16,), IMAGE_ID), ids[n // 2 :]])
        rows.append(ids)
    longest = max(len(r) for r in rows)
    ids = torch.full((len(rows), longest), PAD_ID)
    mask = torch.zeros_like(ids)
    for b, row in enumerate(rows):
        ids[b, longest - len(row) :], mask[b, longest - len(row) :] = row, 1
    return ids, mask


def converse(
    model, first: dict, turns: list[dict], cache_arg: str = "past_key_values"
) -> list[tuple[list, Tensor]]:
    """Greedy answers (tokens, logits) to ``first`` and then each of ``turns`` (dicts with ids,
    mask and, for an image turn, its pixel values), each turn sent as the whole history plus
    the turn, with the previous answer's cache (passed as ``cache_arg``)."""
    inputs, answers, cache, out = dict(first), [], None, None
    for turn in [None, *turns]:
        if turn is not None:
            history = out.sequences
            done = torch.ones(history.shape[0], history.shape[1] - inputs["input_ids"].shape[1])
            mask = torch.cat([inputs["attention_mask"], done.long(), turn["mask"]], dim=1)
            inputs = dict(input_ids=torch.cat([history, turn["ids"]], 1), attention_mask=mask)
            if "pixel_values" in turn:
                inputs["pixel_values"] = turn["pixel_values"]
        with torch.no_grad():
            out = model.generate(
                **inputs, **{cache_arg: cache}, max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                return_dict_in_generate=True,
            )  # fmt: skip
        cache = out.past_key_values
        answers.append((out.sequences[:, -NEW_TOKENS:].tolist(), torch.stack(out.logits, 1)))
    return answers


def three_turns(model, batch: int) -> tuple[dict, list[dict]]:
    """A prompt with two images (rows left-padded differently), a text turn and an image turn
    (rows of different lengths: padding inside the conversation)."""
    first = tiny_inputs(model, "llava", batch=batch, seed=3, pads=[0, 7][:batch])
    ids, mask = turn_ids([40, 29][:batch], seed=5)
    text = dict(ids=ids, mask=mask)
    ids, mask = turn_ids([30, 45][:batch], seed=6, image=True)
    pixels = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    return first, [text, dict(ids=ids, mask=mask, pixel_values=pixels)]


def assert_same_answers(got, want) -> None:
    for (tokens, logits), (want_tokens, want_logits) in zip(got, want, strict=True):
        torch.testing.assert_close(logits, want_logits, atol=1e-4, rtol=1e-4)
        assert tokens == want_tokens


@pytest.mark.parametrize(("batch", "kernel"), [(1, "sdpa"), (2, "sdpa"), (2, "flex")])
def test_full_is_the_unmodified_model_over_three_turns(batch, kernel):
    model = tiny_model("llava")
    # both cache argument names (transformers 5.24 renamed past_key_values to cache)
    names = inspect.signature(model.forward).parameters
    cache_arg = "cache" if batch == 2 and "cache" in names else "past_key_values"
    first, turns = three_turns(model, batch)
    want = converse(model, first, turns, cache_arg)
    csp_inductor.compile(model, Full(), compile=False, kernel=kernel)
    got = converse(model, first, turns, cache_arg)
    assert_same_answers(got, want)
    cache = model.csp_backend.cache
    # padding is never stored: every row holds exactly its real tokens
    assert cache.padding == ([0] if batch == 1 else [15, 18])
    assert cache.rows == [int(cache.seen) - pad for pad in cache.padding]


def test_full_compiled_over_three_turns_and_no_new_graph_for_new_lengths():
    model = tiny_model("llava")
    first, turns = three_turns(model, batch=1)
    want = converse(model, first, turns)
    csp_inductor.compile(model, Full())
    assert_same_answers(converse(model, first, turns), want)
    graphs = model.csp_backend.graphs
    assert model.csp_backend.fallback is None and graphs == 3  # prefill, turn, decode
    ids, mask = turn_ids([23], seed=9)
    converse(model, tiny_inputs(model, "llava", seed=4), [dict(ids=ids, mask=mask)])
    assert model.csp_backend.graphs == graphs


def test_qwen2_vl_text_turns_keep_mrope_positions():
    # the new turn's M-RoPE positions come from the model (its rope deltas), the cache reports
    # the tokens seen
    model = tiny_model("qwen2_vl")
    first = tiny_inputs(model, "qwen2_vl", seed=2)
    turns = []
    for seed, n in ((5, 33), (6, 21)):
        ids, mask = turn_ids([n], seed=seed)
        turns.append(dict(ids=ids, mask=mask))

    def with_types(model):
        # mm_token_type_ids must cover the whole history: text for the new tokens
        generate = model.generate

        def wrapped(**kwargs):
            types = first.get("mm_token_type_ids")  # (transformers >= 5.3)
            if types is not None:
                extra = kwargs["input_ids"].shape[1] - types.shape[1]
                kwargs["mm_token_type_ids"] = torch.cat([types, types.new_zeros(1, extra)], 1)
            kwargs.setdefault("image_grid_thw", first["image_grid_thw"])
            return generate(**kwargs)

        return wrapped

    model.generate = with_types(model)
    want = converse(model, first, turns)
    del model.generate
    csp_inductor.compile(model, Full(), compile=False)
    model.generate = with_types(model)
    assert_same_answers(converse(model, first, turns), want)


# --- pruned turns: compaction = masking ------------------------------------------------------
ORACLE = "csp_conversation_oracle"


def masked_oracle(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Attention over the full cache, causal, with the positions the pruned cache dropped
    before this forward masked: ``module.csp_keep`` (batch, kv_heads, decided) bool."""
    keep = module.csp_keep
    b, hq, t, _ = query.shape
    hkv, total = key.shape[1], key.shape[2]
    allowed = torch.ones(b, hkv, total, dtype=torch.bool)
    allowed[:, :, : keep.shape[-1]] = keep
    causal = torch.ones(t, total, dtype=torch.bool).tril(total - t)
    allowed = allowed.repeat_interleave(hq // hkv, 1)[:, :, None, :] & causal
    k, v = key.repeat_interleave(hq // hkv, 1), value.repeat_interleave(hq // hkv, 1)
    logits = (query @ k.transpose(-1, -2)) * scaling
    out = torch.softmax(logits.masked_fill(~allowed, -math.inf), -1) @ v
    return out.transpose(1, 2).contiguous(), None


def stored(cache) -> list[torch.Tensor]:
    """Per layer, (batch, kv_heads, seen) bool: the positions the cache holds."""
    seen = int(cache.seen)
    out = []
    for layer in cache.pruned:
        keep = torch.zeros(*layer.positions.shape[:2], seen + 1, dtype=torch.bool)
        pos = layer.positions.masked_fill(layer.positions < 0, seen)
        slots = torch.arange(pos.shape[2]) < cache.lengths[:, None, None]
        keep.scatter_(2, torch.where(slots, pos, seen), True)
        out.append(keep[..., :seen])
    return out


@pytest.mark.parametrize("policy", [CSP(), SnapKV()], ids=repr)
def test_pruned_turns_equal_masking(policy):
    model = tiny_model("llava")
    first, (text, image) = three_turns(model, batch=1)
    forwards = [first]  # the prompt, decode steps, each turn, decode steps
    csp_inductor.compile(model, policy, compile=False)
    cache = model.csp_backend.new_cache(decode_capacity=4)
    keeps, logits, mask = [], [], first["attention_mask"]
    out = model(**first, past_key_values=cache)
    logits.append(out.logits[:, -1])
    for turn in (None, text, image, None):
        for _ in range(3):
            tok = out.logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(tok)], 1)
            forwards.append(dict(input_ids=tok, attention_mask=mask))
            keeps.append(stored(cache))
            out = model(**forwards[-1], past_key_values=cache)
            logits.append(out.logits[:, -1])
        if turn is None:
            continue
        seen = int(cache.seen)
        mask = torch.cat([mask, turn["mask"]], 1)
        forwards.append(dict(input_ids=turn["ids"], attention_mask=mask))
        if "pixel_values" in turn:
            forwards[-1]["pixel_values"] = turn["pixel_values"]
        keeps.append(stored(cache))
        lengths = cache.rows[0]
        out = model(**forwards[-1], past_key_values=cache)
        logits.append(out.logits[:, -1])
        # the turn's kept tokens follow the prefix, at their absolute positions
        width = turn["ids"].shape[1]
        kept = policy.budget_for(width).kept
        assert kept < width and cache.rows[0] == lengths + kept
        for layer in cache.pruned:
            new = layer.positions[0, :, lengths : lengths + kept]
            assert new.min() >= seen and new.max() < seen + width
    for layer in cache.pruned:  # ascending absolute positions, all distinct
        pos = layer.positions[0, :, : cache.rows[0]]
        assert (pos[:, 1:] > pos[:, :-1]).all() and pos.max() < int(cache.seen)
    csp_inductor.restore(model)
    AttentionInterface.register(ORACLE, masked_oracle)
    model.set_attn_implementation({"text_config": ORACLE})
    modules = [layer.self_attn for layer in model.model.language_model.layers]
    for module in modules:
        module.csp_keep = torch.ones(1, 2, 0, dtype=torch.bool)
    out = model(**forwards[0])
    full = out.past_key_values
    want = [out.logits[:, -1]]
    for step, keep in zip(forwards[1:], keeps, strict=True):
        for module, layer_keep in zip(modules, keep, strict=True):
            module.csp_keep = layer_keep
        want.append(model(**step, past_key_values=full).logits[:, -1])
    torch.testing.assert_close(torch.cat(logits), torch.cat(want), atol=1e-5, rtol=1e-5)


def test_padded_batch_turn_prunes_each_row_by_its_own_length():
    model = csp_inductor.compile(tiny_model("llava"), CSP(), compile=False)
    first, (text, image) = three_turns(model, batch=2)
    converse(model, first, [text, image])
    cache = model.csp_backend.cache
    for (real, kept), turn in zip(cache.turns[1:], (text, image), strict=True):
        # the last answer token opens the turn
        assert real == (turn["mask"].sum(1) + 1).tolist()
        assert kept == [CSP().budget_for(n).kept for n in real]
    assert cache.padding == [15, 18]  # 0 and 7 in the prompt, 0 and 11, then 15 and 0
    for layer in cache.pruned:
        for row, length in enumerate(cache.rows):
            pos = layer.positions[row, :, :length]
            assert (pos[:, 1:] > pos[:, :-1]).all()


# --- what a turn cannot do ---------------------------------------------------------------------
def test_history_mask_must_match_the_cache():
    model = csp_inductor.compile(tiny_model("llava"), CSP(), compile=False)
    first, (text, _) = three_turns(model, batch=1)
    cache = model.csp_backend.new_cache()
    model(**first, past_key_values=cache)
    seen = int(cache.seen)
    mask = torch.cat([torch.ones(1, seen, dtype=torch.long), text["mask"]], 1)
    mask[0, 3] = 0  # a token the cache already holds
    with pytest.raises(ValueError, match=r"exactly the padding of the earlier turns \(\[0\]"):
        model(input_ids=text["ids"], attention_mask=mask, past_key_values=cache)
    with pytest.raises(ValueError, match="attention_mask must cover the turn's 40 new tokens"):
        model(input_ids=text["ids"], attention_mask=mask[:, 5:], past_key_values=cache)


def test_a_new_image_on_a_bidirectional_image_model_is_refused():
    model = tiny_model("gemma3")
    first = tiny_inputs(model, "gemma3", seed=1)
    csp_inductor.compile(model, Full(), compile=False)
    out = model.generate(**first, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    second = tiny_inputs(model, "gemma3", seed=2)
    ids = torch.cat([out.sequences, second["input_ids"]], 1)
    types = torch.cat([first["token_type_ids"], torch.zeros(1, 2, dtype=torch.long)], 1)
    kwargs = dict(
        input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=second["pixel_values"],
        token_type_ids=torch.cat([types, second["token_type_ids"]], 1),
    )  # fmt: skip
    with pytest.raises(ValueError, match="non-causal mask inside the turn"):
        model.generate(**kwargs, past_key_values=out.past_key_values, max_new_tokens=2)


def test_models_sharing_kv_across_layers_are_refused():
    model = tiny_family_model(known_model_types("gemma4", "gemma3n_text")[0])
    csp_inductor.compile(model, Full(), compile=False)
    ids = torch.randint(*TEXT_IDS, (1, 30), generator=torch.Generator().manual_seed(0))
    out = model.generate(
        input_ids=ids, max_new_tokens=2, do_sample=False, return_dict_in_generate=True
    )
    more = torch.cat([out.sequences, ids[:, :12]], 1)
    with pytest.raises(ValueError, match=r"cannot continue a conversation on .*share K/V"):
        model.generate(input_ids=more, past_key_values=out.past_key_values, max_new_tokens=2)


def test_a_turn_that_raises_leaves_the_cache_as_it_was():
    model = csp_inductor.compile(tiny_model("llava"), CSP(), compile=False)
    first, (text, image) = three_turns(model, batch=1)
    cache = model.csp_backend.new_cache()
    model(**first, past_key_values=cache)
    held, seen = list(cache.rows), int(cache.seen)
    with pytest.raises(ValueError, match=r"[Ii]mage features and image tokens do not match"):
        pixels = image["pixel_values"].repeat(2, 1, 1, 1)  # two images for one placeholder run
        model(input_ids=image["ids"], pixel_values=pixels, past_key_values=cache)
    assert cache.rows == held and int(cache.seen) == seen and len(cache.turns) == 1
    model(input_ids=text["ids"], past_key_values=cache)
    assert cache.phase == "decode" and len(cache.turns) == 2
    assert int(cache.seen) == seen + text["ids"].shape[1]
