"""One rank of tests/test_distributed.py's tensor-parallel run (under ``torchrun``), written
to ``<out>/rank<r>.json``:

- the built-in model split by transformers' TP plan generates a left-padded batch of 2, plain,
  with ``Full()`` and with ``CSP(0.2)`` (eager, and compiled when asked);
- tiny Qwen2-VL (M-RoPE), Gemma 3 (sliding layers) and Gemma 3n (KV shared across layers)
  generate a left-padded batch of 2 in one process (every rank builds the same weights) and
  then split over the ranks;
- what ``compile`` and the attention refuse: heads that do not divide over the ranks, a DTensor
  query; a rank whose share fails makes the other's gather raise."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import csp_inductor
from csp_inductor.distributed import Ranks, head_shards, tp_loading
from csp_inductor.evaluation import haystack as hs
from csp_inductor.evaluation.eval import pruning
from csp_inductor.policies import CSP, Full
from csp_inductor.testing import (
    FAMILIES,
    placeholder_inputs,
    tiny_family_model,
    tiny_inputs,
    tiny_model,
)

NEW_TOKENS = 8


def batch() -> dict:
    """Two prompts of different lengths (the shorter one left-padded)."""
    data = hs.make_split("test", 6, seed=3)
    by_length = sorted(data, key=lambda s: len(s.input_ids))
    return hs.collate([by_length[0], by_length[-1]])


@torch.no_grad()
def generate(model, inputs: dict) -> list[list[int]]:
    out = model.generate(
        **inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
        pad_token_id=hs.PAD_TOKEN_ID, eos_token_id=hs.EOS_TOKEN_ID,
    )  # fmt: skip
    return out[:, inputs["input_ids"].shape[1] :].tolist()


def run(model, compiled: bool) -> dict:
    inputs, got = batch(), {"plain": generate(model, batch())}
    for name, policy in (("full", Full()), ("csp", CSP(0.2))):
        with pruning(model, policy, compile=False) as backend:
            got[name] = {"tokens": generate(model, inputs), "nbytes": backend.cache.nbytes()}
    if compiled:
        from torch._dynamo.utils import counters

        counters.clear()
        with pruning(model, CSP(0.2), compile=True) as backend:
            tokens = generate(model, inputs)
            got["compiled"] = {
                "tokens": tokens, "graphs": backend.graphs, "fallback": backend.fallback,
                "graph_breaks": sum(counters["graph_break"].values()),
            }  # fmt: skip
    return got


def split(model, out: str, name: str):
    """``model`` (the same weights on every rank) saved, and loaded split by its TP plan."""
    where = Path(out, name)
    if dist.get_rank() == 0:
        model.save_pretrained(where)
    dist.barrier()
    loaded = type(model).from_pretrained(where, **tp_loading())
    loaded.set_attn_implementation("sdpa")
    return loaded.eval()


def families(out: str) -> dict:
    """Per family, in one process and split: tokens, the cache's bytes, the heads' split."""
    got = {}
    for family in ("qwen2_vl", "gemma3", "gemma3n_text"):
        if family in FAMILIES:
            model = tiny_model(family)
            inputs = tiny_inputs(model, family, batch=2, pads=[0, 5])
        else:
            model = tiny_family_model(family)
            inputs = placeholder_inputs(model, batch=2, pads=[0, 5])
        runs = {"one": {"plain": generate(model, inputs)}}
        for where in ("one", "tp"):
            if where == "tp":
                model = split(model, out, family)
                runs["tp"] = {"plain": generate(model, inputs)}
            for name, policy in (("full", Full()), ("csp", CSP(0.2))):
                with pruning(model, policy) as backend:
                    runs[where][name] = generate(model, inputs)
                    runs[where][f"{name}_nbytes"] = backend.cache.nbytes()
                    runs[where]["shards"] = sorted(set(backend.head_shards.values()))
        got[family] = runs
    return got


def refusals(out: str) -> dict:
    from torch.distributed.tensor import DTensor, Replicate
    from transformers import LlamaConfig, LlamaForCausalLM

    from csp_inductor.transformers_attention import _check_heads

    got = {}
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=96, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=6, num_key_value_heads=3, head_dim=16,
    )  # fmt: skip
    model = split(LlamaForCausalLM(config).eval(), out, "uneven")
    got["uneven"] = got["dtensor_query"] = "did not raise"
    try:
        csp_inductor.compile(model, compile=False)
    except ValueError as e:
        got["uneven"] = str(e)
    spec = csp_inductor.cache_layer.LayerSpec(2, 16, q_heads=4)
    mesh = model._device_mesh["tp"]
    query = DTensor.from_local(torch.zeros(1, 4, 3, 16), mesh, [Replicate()])
    try:
        _check_heads(spec, query, torch.zeros(1, 2, 3, 16))
    except ValueError as e:
        got["dtensor_query"] = str(e)
    ranks = Ranks.launched()
    try:  # one rank fails its share: the other's gather raises instead of waiting
        with ranks.failing_together():
            if ranks.rank == 1:
                raise ValueError("a failing share")
        ranks.gather("done")
    except (ValueError, RuntimeError) as e:
        got["peer_failure"] = f"{type(e).__name__}: {e}"
    return got


def main(out: str, compiled: bool) -> None:
    torch.set_num_threads(1)
    model = hs.load_builtin_model(tp_plan="auto")
    attn = model.model.language_model.layers[0].self_attn
    got = {"shards": head_shards(attn), **run(model, compiled)}
    got["families"], got["refusals"] = families(out), refusals(out)
    Path(out, f"rank{dist.get_rank()}.json").write_text(json.dumps(got))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], "--compiled" in sys.argv[2:])
