"""The ahead-of-time gate: the Triton kernels compiled for sm_80 and sm_90 on a CPU machine.

The sweep (every config × dtype × head-dim block × arch, ``make aot``, ~12 min from scratch)
writes ``kernels/aot_resources.json``, which the autotune pruning reads. Here:

- the table was made from the kernels as they are now and covers every case;
- a sample of it compiles again to the same figures; variants with the flags off pass too;
- on sm_80/sm_90 the pruning keeps exactly the configs that pass the gate (no compile error,
  shared memory within the limit, no register spills), and there is one for every dtype and
  head dim; elsewhere its shared-memory formula never keeps a config that does not fit.
"""

import importlib.util
from dataclasses import replace
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="the kernels need Triton")
aot = pytest.importorskip("csp_inductor.kernels.aot")
from csp_inductor.kernels import decomposed_scores  # noqa: E402

SWEEP = Path(__file__).parents[1] / "bench" / "aot_resources.py"
FIGURES = ("registers", "stack", "spill_stores", "shared")
CONFIGS = {name: configs for name, configs, _ in aot.SCORE_KERNELS}


@pytest.fixture(scope="module")
def sweep():
    spec = importlib.util.spec_from_file_location("aot_resources", SWEEP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def table():
    import json

    return json.loads(Path(aot.__file__).with_name("aot_resources.json").read_text())


def test_table_is_current_and_complete(table, sweep):
    assert table["sources"] == sweep.sources_hash(), (
        "the kernels changed since kernels/aot_resources.json was made: run make aot"
    )
    assert {aot.Case.from_row(row) for row in table["rows"]} == set(aot.cases())
    assert not [row for row in table["rows"] if "error" in row]


def test_a_sample_compiles_again_to_the_tables_figures_and_flags_off_pass(table):
    sample = [table["rows"][i] for i in (0, 101, 222, 333)]
    flags_off = [
        aot.Case.from_row(r) for r in table["rows"]
        if r["arch"] == 90 and r["dtype"] == "bf16" and r["width"] == 128 and not r["problems"]
        and r["kernel"] != "n_softmax" and (r["block_m"], r["block_n"]) == (64, 64)
    ]  # fmt: skip
    flags_off = [replace(c, flags=tuple((name, False) for name, _ in c.flags)) for c in flags_off]
    assert len(flags_off) >= 2
    again = aot.resources_isolated([aot.Case.from_row(r) for r in sample] + flags_off)
    for row, new in zip(sample, again, strict=False):
        assert {k: new[k] for k in FIGURES} == {k: row[k] for k in FIGURES}
    assert [aot.problems(row) for row in again[len(sample) :]] == [[]] * len(flags_off)


def _groups(table):
    groups = {}
    for row in table["rows"]:
        if row["kernel"] != "n_softmax":
            key = (row["kernel"], row["arch"], row["dtype"], row["width"])
            groups.setdefault(key, []).append(row)
    return groups


def _prune(kernel, dtype, block_d, arch, monkeypatch):
    monkeypatch.setattr(decomposed_scores, "_arch", lambda device: arch)
    configs = CONFIGS[kernel]
    args = {"window": 4096, "seq": 1 << 16, "q_ptr": torch.empty(0, dtype=aot.TORCH_DTYPE[dtype])}
    if kernel == "window_shift":
        args["wmask_ptr"] = None
    kept = decomposed_scores._prune(configs, args, BLOCK_D=block_d)
    return {decomposed_scores._key(cfg) for cfg in kept}


def test_pruning_keeps_exactly_the_configs_that_pass(table, monkeypatch):
    for (kernel, arch, dtype, block_d), rows in _groups(table).items():
        passing = {(r["block_m"], r["block_n"], r["num_warps"], r["num_stages"])
                   for r in rows if not r["problems"]}  # fmt: skip
        assert passing, (kernel, arch, dtype, block_d)
        assert _prune(kernel, dtype, block_d, arch, monkeypatch) == passing


def test_shared_memory_formula_never_keeps_a_config_that_does_not_fit(table):
    for (kernel, arch, dtype, block_d), rows in _groups(table).items():
        for r in rows:
            cfg = next(
                c for c in CONFIGS[kernel]
                if decomposed_scores._key(c)
                == (r["block_m"], r["block_n"], r["num_warps"], r["num_stages"])
            )  # fmt: skip
            estimate = decomposed_scores._smem(cfg, kernel, block_d, 2 if dtype != "fp32" else 4)
            limit = aot.SMEM_LIMIT[arch]
            # never kept when it does not fit; dropped when it fits only where Triton itself
            # shrank the pipeline below the configured depth (half the estimate or less)
            assert estimate > limit or r["shared"] <= limit, r
            assert estimate <= limit or r["shared"] > limit or 2 * r["shared"] <= estimate, r
