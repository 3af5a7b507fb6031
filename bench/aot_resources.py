"""Compile every Triton kernel variant for sm_80 and sm_90 on this (CPU) machine; write the
resource table.

    python bench/aot_resources.py [--jobs N]        # or: make aot

Writes ``kernels/aot_resources.json`` (one row per kernel × config × dtype × head-dim block
× arch: registers, stack, spills, shared memory, occupancy estimate, gate problems; with the hash
of the kernel sources it was made from) and prints the per-config summary table that
bench/README.md shows. ``tests/test_aot.py`` checks the table against the sources and
recompiles a sample of it.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import multiprocessing
import time
from collections import defaultdict
from pathlib import Path

import triton

from csp_inductor.kernels import aot

# next to the kernels: the autotune pruning reads it (decomposed_scores._prune)
RESULTS = Path(aot.__file__).with_name("aot_resources.json")


def sources_hash() -> str:
    """Of the kernels' source code (not of their configs: a new config adds rows, the old
    ones stay valid), and of the Triton version that compiled them."""
    digest = hashlib.sha256(triton.__version__.encode())
    for kernel in aot.KERNELS:
        digest.update(inspect.getsource(kernel.fn).encode())
    return digest.hexdigest()[:16]


def summary(rows: list[dict]) -> str:
    """Markdown: per kernel × config × arch, the worst case over dtypes and head-dim blocks."""
    groups = defaultdict(list)
    for row in rows:
        config = aot.Case.from_row(row).config
        groups[row["kernel"], config, row["arch"]].append(row)
    lines = [
        "| kernel | config | arch | registers (max) | cases that spill | spills (max B) "
        "| shared (max B) | occupancy (min) | gate |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (kernel, config, arch), group in sorted(groups.items()):
        ok = [r for r in group if "error" not in r]
        spilled = sum(r["spill_stores"] > 0 for r in ok)
        most = max((r["spill_stores"] for r in ok), default=0)
        failed = sum(bool(r["problems"]) for r in group)
        lines.append(
            f"| {kernel} | {config} | sm_{arch} | {max(r['registers'] for r in ok)} | "
            f"{spilled} of {len(ok)} | {most} | "
            f"{max(r['shared'] for r in ok)} | {min(r['occupancy'] for r in ok):.2f} | "
            f"{'pass' if not failed else f'{failed} fail'} |"
        )
    return "\n".join(lines)


def write(rows: list[dict], failed: list[dict]) -> None:
    """The table, one row per line (diffs stay readable)."""
    head = {"sources": sources_hash(), "triton": triton.__version__, "cases": len(rows),
            "failed": len(failed)}  # fmt: skip
    lines = ",\n".join(json.dumps(row, separators=(",", ":")) for row in rows)
    RESULTS.write_text(json.dumps(head)[:-1] + ', "rows": [\n' + lines + "\n]}\n")


def run(case: aot.Case) -> dict:
    row = aot.resources(case)
    return {**row, "problems": aot.problems(row)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=multiprocessing.cpu_count())
    args = parser.parse_args()
    cases = aot.cases()
    known = {}
    if RESULTS.exists():  # rows of unchanged kernels are kept; only new cases compile
        old = json.loads(RESULTS.read_text())
        if old["sources"] == sources_hash():
            known = {aot.Case.from_row(row): row for row in old["rows"]}
    todo = [case for case in cases if case not in known]
    start = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        done = dict(zip(todo, pool.map(run, todo, chunksize=4), strict=True))
    seconds = time.perf_counter() - start
    rows = [known.get(case) or done[case] for case in cases]
    rows = [{**row, "problems": aot.problems(row)} for row in rows]
    failed = [row for row in rows if row["problems"]]
    write(rows, failed)
    print(summary(rows))
    print(f"\n{len(todo)} of {len(rows)} cases compiled in {seconds:.0f} s (the rest known);")
    print(f"{len(failed)} fail the gate")
    for row in failed:
        print(f"  {row['kernel']} sm_{row['arch']} {row['dtype']} {row['width']}", end=" ")
        print(f"{row['block_m']}x{row['block_n']} w{row['num_warps']}: {row['problems']}")


if __name__ == "__main__":
    main()
