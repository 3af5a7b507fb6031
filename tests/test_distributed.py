"""More than one process (2, gloo on localhost): tensor parallelism through transformers' TP
plans, data-parallel and tensor-parallel evaluation, and the layouts ``compile`` refuses."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tp_worker import batch, run

import csp_inductor
from csp_inductor.cache_layer import LayerSpec
from csp_inductor.distributed import ALONE, Ranks, check_layout
from csp_inductor.evaluation import haystack as hs
from csp_inductor.evaluation.eval import PolicySpec, evaluate_haystack
from csp_inductor.testing import tiny_model
from csp_inductor.transformers_attention import _check_heads

WORKER = Path(__file__).with_name("tp_worker.py")
ROOT = Path(__file__).parents[1]


def torchrun(*args: str, cwd: Path = ROOT) -> None:
    """``torchrun --standalone --nproc-per-node 2 ARGS`` (the launcher's own free port)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
    done = subprocess.run(
        [*command, "2", *args], cwd=cwd, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """What each of 2 tensor-parallel ranks generated (tests/tp_worker.py)."""
    out = tmp_path_factory.mktemp("tp")
    torchrun(str(WORKER), str(out), "--compiled")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def one_process() -> dict:
    """The same generations in one process (eager)."""
    torch.set_num_threads(1)
    return run(hs.load_builtin_model(), compiled=False)


@pytest.mark.slow
def test_each_rank_holds_half_the_heads(ranks):
    assert [r["shards"] for r in ranks] == [2, 2]


@pytest.mark.slow
def test_the_split_model_matches_one_process(ranks, one_process):
    """transformers' own TP is exact here (greedy, fp32): the comparisons below can be exact."""
    for r in ranks:
        assert r["plain"] == one_process["plain"]


@pytest.mark.slow
def test_full_is_token_identical_to_the_unmodified_split_model(ranks):
    for r in ranks:
        assert r["full"]["tokens"] == r["plain"]


@pytest.mark.slow
def test_csp_is_token_identical_to_one_process(ranks, one_process):
    assert one_process["csp"]["tokens"] != one_process["plain"]  # CSP changes the answer here
    for r in ranks:
        assert r["csp"]["tokens"] == one_process["csp"]["tokens"]


@pytest.mark.slow
def test_each_rank_caches_half_the_bytes(ranks, one_process):
    for r in ranks:
        for name in ("full", "csp"):
            assert 2 * r[name]["nbytes"] == one_process[name]["nbytes"], name


@pytest.mark.slow
def test_compiled_under_tp_is_one_graph_per_phase_and_exact(ranks, one_process):
    for r in ranks:
        got = r["compiled"]
        assert got["tokens"] == one_process["csp"]["tokens"]
        assert (got["graphs"], got["fallback"], got["graph_breaks"]) == (2, None, 0)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2_vl", "gemma3", "gemma3n_text"])
def test_other_families_under_tp(ranks, family):
    """M-RoPE (Qwen2-VL), sliding layers (Gemma 3), KV shared across layers (Gemma 3n), batch
    2 left-padded: split in two, the same tokens from half the bytes."""
    for r in ranks:
        one, tp = r["families"][family]["one"], r["families"][family]["tp"]
        assert (one["shards"], tp["shards"]) == ([1], [2])
        assert tp["plain"] == one["plain"] == one["full"]
        assert tp["full"] == tp["plain"]
        assert tp["csp"] == one["csp"]
        for name in ("full", "csp"):
            assert 2 * tp[f"{name}_nbytes"] == one[f"{name}_nbytes"], name


@pytest.mark.slow
def test_heads_that_do_not_split_evenly_are_refused(ranks):
    for r in ranks:
        message = r["refusals"]["uneven"]
        assert "(KV heads)=3 does not divide by 2" in message and "tp_size dividing" in message


@pytest.mark.slow
def test_a_dtensor_query_is_refused(ranks):
    for r in ranks:
        assert "received the attention query as a DTensor" in r["refusals"]["dtensor_query"]


@pytest.mark.slow
def test_a_failing_share_raises_on_every_rank(ranks):
    """Rank 1 fails inside ``failing_together``: rank 0's gather raises instead of waiting."""
    assert ranks[0]["refusals"]["peer_failure"] == (
        "RuntimeError: rank 1 failed: ValueError: a failing share"
    )
    assert ranks[1]["refusals"]["peer_failure"] == "ValueError: a failing share"


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("pp_size", 2, "pipeline stages"),
        ("fsdp_size", 2, "FSDP"),
        ("dp_replicate_size", 2, "replicated data parallelism"),
        ("ep_size", 3, "expert parallelism"),
        ("enable_sequence_parallel", True, "sequence parallelism"),
    ],
)
def test_unsupported_layouts_are_refused_at_compile(field, value, named):
    model = tiny_model("llama")
    model.config.distributed_config = SimpleNamespace(**{field: value})
    with pytest.raises(ValueError, match=named) as error:
        csp_inductor.compile(model, compile=False)
    assert f"{field}={value}" in str(error.value)
    assert getattr(model, "csp_backend", None) is None


def test_a_sequence_parallel_plan_is_refused_once_the_model_is_split_by_it():
    plan = {"layers.*.input_layernorm": "sequence_parallel"}
    check_layout(SimpleNamespace(config=SimpleNamespace(), tp_plan=plan), {})  # declared only
    model = SimpleNamespace(config=SimpleNamespace(), tp_plan=plan, _tp_size=2)
    with pytest.raises(ValueError, match=r"'sequence_parallel'.*input_layernorm"):
        check_layout(model, {})


def test_heads_the_cache_was_not_made_for_are_refused():
    spec = LayerSpec(2, 16, q_heads=4)
    _check_heads(spec, torch.zeros(1, 4, 3, 16), torch.zeros(1, 2, 3, 16))  # as made
    with pytest.raises(ValueError, match=r"cache is for 2 KV heads.*key heads=1 \(query heads=2"):
        _check_heads(spec, torch.zeros(1, 2, 3, 16), torch.zeros(1, 1, 3, 16))


def test_ranks_deal_and_gather_alone():
    assert ALONE.deal([1, 2, 3]) == [1, 2, 3] and ALONE.gather("x") == ["x"]
    assert Ranks(1, 2).deal([0, 1, 2, 3, 4]) == [1, 3]


EVAL_ARGS = dict(samples=3, seed=11, batch_size=2, budgets=[0.2])


@pytest.fixture(scope="module")
def one_process_table() -> list[dict]:
    specs = [PolicySpec("full"), PolicySpec("csp")]
    return evaluate_haystack(hs.load_builtin_model(), specs, **EVAL_ARGS)


def _eval_command(out: Path, *extra: str) -> list[str]:
    return [
        "-m", "csp_inductor", "eval", "--policies", "full,csp", "--budgets", "0.2",
        "--samples", "3", "--seed", "11", "--batch-size", "2", "--json", str(out), *extra,
    ]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("tp", [False, True], ids=["data_parallel", "tensor_parallel"])
def test_distributed_eval_gives_the_table_of_one_process(tmp_path, one_process_table, tp):
    out = tmp_path / "results.json"
    torchrun(*_eval_command(out, *(["--tp"] if tp else [])))
    assert json.loads(out.read_text())["results"] == one_process_table
    assert len(one_process_table) > 2 and 0 < one_process_table[-1]["kv_fraction"] < 0.5


def test_tp_eval_needs_a_launch(capsys):
    from csp_inductor.evaluation.eval import main

    with pytest.raises(SystemExit):
        main(["--tp", "--samples", "1"])
    assert "torchrun --nproc-per-node N" in capsys.readouterr().err


def test_the_worker_batch_is_left_padded():
    inputs = batch()
    assert inputs["input_ids"].shape[0] == 2
    assert inputs["attention_mask"][0, 0] == 0 and inputs["attention_mask"][1].all()
