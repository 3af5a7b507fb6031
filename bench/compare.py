"""A benchmark of this checkout against another commit's, as ratios measured side by side.

    python bench/compare.py BASE [--rounds 3] [--metric GLOB ...] -- PYTEST_ARGS

checks ``BASE`` (any git revision) out into a temporary worktree and runs
``python -m pytest PYTEST_ARGS --benchmark-json ...`` there and here in turn, ``--rounds``
times each (one process per run, alternating, so both see the same machine), with the
environment this script has (``CSP_BENCH_*`` sizes pass through). Each run's figures are the
numbers in every benchmark's ``extra_info`` (nested keys joined by dots); the report gives, per
benchmark and per figure matching a ``--metric`` pattern (fnmatch, default ``*_s`` and
``*ms_per_token``), both medians and the median over rounds of this checkout's figure over the
base's: below 1 is faster here. Example (the decode and prefill figures of one shape)::

    CSP_BENCH_TOKENS_MODELS=1024,4,16,4 CSP_BENCH_TOKENS_THREADS=0 \\
        python bench/compare.py HEAD~1 --metric 'providers.csp.*' -- bench/bench_tokens.py
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def _figures(info: dict, prefix: str = "") -> dict[str, float]:
    """The numbers in ``info``, by dotted key."""
    out = {}
    for key, value in info.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_figures(value, f"{name}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def _run(tree: Path, pytest_args: list[str], out: Path) -> dict[str, dict[str, float]]:
    """One pytest run of the benchmarks in ``tree``: ``{benchmark: {figure: value}}``."""
    command = [sys.executable, "-m", "pytest", *pytest_args, "-q", "-p", "no:cacheprovider",
               f"--benchmark-json={out}"]  # fmt: skip
    done = subprocess.run(command, cwd=tree, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"benchmark failed in {tree}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    report = json.loads(out.read_text())
    return {b["name"]: _figures(b["extra_info"]) for b in report["benchmarks"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("base", help="the git revision to compare against")
    p.add_argument("--rounds", type=int, default=3, help="runs of each tree, alternating")
    p.add_argument("--metric", action="append", help="figures to report (fnmatch patterns)")
    p.add_argument("pytest_args", nargs="+", help="after --: what to run (a bench file, -k ...)")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error(f"--rounds must be >= 1, got {args.rounds}")
    patterns = args.metric or ["*_s", "*ms_per_token"]
    runs: dict[str, list] = {"base": [], "here": []}
    with tempfile.TemporaryDirectory() as scratch:
        base = Path(scratch) / "base"
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(base), args.base], cwd=HERE, check=True,
            capture_output=True,
        )  # fmt: skip
        try:
            for r in range(args.rounds):
                for name, tree in (("base", base), ("here", HERE)):
                    runs[name].append(_run(tree, args.pytest_args, Path(scratch) / f"{r}.json"))
                    print(f"round {r + 1}/{args.rounds}: {name} done", file=sys.stderr)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=HERE)
    print(f"{'benchmark / figure':<72}{'base':>11}{'here':>11}{'here/base':>11}")
    for bench in runs["here"][0]:
        for figure in sorted(runs["here"][0][bench]):
            if not any(fnmatch.fnmatch(figure, pattern) for pattern in patterns):
                continue
            if figure not in runs["base"][0].get(bench, {}):
                print(f"{bench + ' / ' + figure:<72}{'(not in base)':>33}")
                continue
            rounds = zip(runs["base"], runs["here"], strict=True)
            pairs = [(b[bench][figure], h[bench][figure]) for b, h in rounds]
            ratio = statistics.median(h / b for b, h in pairs if b)
            base_m, here_m = (statistics.median(x) for x in zip(*pairs, strict=True))
            print(f"{bench + ' / ' + figure:<72}{base_m:>11.4g}{here_m:>11.4g}{ratio:>11.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
