"""Evaluation harness: policies × budgets × tasks -> accuracy table, JSON and a plot.

    python -m csp_inductor eval --policies full,csp,snapkv --budgets 0.05,0.1,0.2,0.4
    python -m csp_inductor eval --mode conversation --variant sparse --policies csp,kvzip,oracle

``--mode conversation``: each context is pruned once, before any question, then several
questions about it are asked in successive turns of one conversation on that cache (every
answer is read from the pruned context; the turns themselves are kept whole). ``oracle``
keeps the evidence of every question (an upper bound), ``random`` random tokens (a control).

A policy is given by name with optional dataclass options, e.g. ``csp:n=0``,
``csp:cross_ratio=0.9`` or ``csp:faithful=true`` (used for ablations). At every budget the
scoring window is ``min(0.1, budget / 2)`` of the prompt (the paper's 0.1 at the default 0.2),
the same for every policy that scores with a window; question-agnostic policies (``kvzip``,
``csp:scoring=reconstruct``) keep ``min(REREAD_WINDOW, budget / 2)`` recent tokens instead.
``full`` ignores the budget and is evaluated once.

Across processes (one host or several)::

    torchrun --nproc-per-node 2 -m csp_inductor eval ...        # the prompts shared out
    torchrun --nproc-per-node 2 -m csp_inductor eval --tp ...   # the model split (TP)

Rank 0 prints and writes the one result table, the same as one process's.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, replace
from pathlib import Path

from tqdm import tqdm

from csp_inductor.distributed import ALONE, Ranks
from csp_inductor.evaluation import haystack as hs
from csp_inductor.evaluation.harness import (
    RunStats,
    decode_speed,
    pruning,
    run_conversations,
    run_haystack,
)
from csp_inductor.evaluation.tables import format_table, plot
from csp_inductor.policies import POLICIES, REREAD_WINDOW, Full, Policy, make_policy

__all__ = [
    "PolicySpec",
    "RunStats",
    "decode_speed",
    "evaluate_haystack",
    "evaluate_milebench",
    "format_table",
    "main",
    "plot",
    "pruning",
    "run_conversations",
    "run_haystack",
]


@dataclass(frozen=True)
class PolicySpec:
    """``name[:key=value,...]`` from the command line."""

    name: str
    options: tuple[tuple[str, object], ...] = ()

    @classmethod
    def parse(cls, text: str) -> PolicySpec:
        name, _, rest = text.strip().partition(":")
        if name not in POLICIES:
            raise ValueError(f"unknown policy {name!r} in {text!r}; known: {sorted(POLICIES)}")
        options = []
        for item in filter(None, rest.split(",")):
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"policy option {item!r} in {text!r} must be key=value")
            options.append((key, _literal(value)))
        return cls(name, tuple(options))

    @classmethod
    def parse_list(cls, text: str) -> list[PolicySpec]:
        """Policies separated by ``;`` (each may then take several options,
        ``csp:scoring=reconstruct,window_ratio=0.02;kvzip``), or by ``,`` when the text has no
        ``;`` (each then takes one option at most: ``full,csp:layers=pyramid,snapkv``)."""
        items = text.split(";") if ";" in text else text.split(",")
        return [cls.parse(item) for item in items if item.strip()]

    @property
    def label(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options)
        return f"{self.name}:{opts}" if opts else self.name

    def build(self, budget: float) -> Policy:
        if self.name == "full":
            return Full()
        options = {"budget": budget, "window_ratio": min(0.1, budget / 2), **dict(self.options)}
        policy = make_policy(self.name, **options)
        if policy.reconstruction is not None and "window_ratio" not in dict(self.options):
            policy = replace(policy, window_ratio=min(REREAD_WINDOW, budget / 2))
        return policy


def _literal(value: str) -> object:
    lowered = value.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def evaluate_haystack(
    model,
    specs: list[PolicySpec],
    budgets: list[float],
    *,
    samples: int,
    seed: int,
    tasks: tuple[str, ...] = hs.TASKS,
    batch_size: int = 8,
    compile: bool = False,
    question_after: bool = False,
    mode: str = "standard",
    fill: float = 0.5,
    questions: int = 4,
    ranks: Ranks = ALONE,
    prefill_chunk: int | None = None,
) -> list[dict]:
    """Accuracy rows per policy × budget × task (and "all"). ``mode="conversation"`` asks up
    to ``questions`` questions per context (:func:`run_conversations`; accuracy over all of
    them); ``fill`` is the boards' chance of a non-empty cell (``hs.SPARSE_FILL``: sparse).
    ``ranks`` share the batches (data parallel); every rank returns the same rows.
    ``prefill_chunk``: prompts stream through the decoder that many tokens at a time; the rows
    then also hold each run's accuracy by the chunk its first question's needle is in (task
    ``chunk k``: the needle's prompt position // ``prefill_chunk``)."""
    conversation = mode == "conversation"
    data = hs.make_split(
        "test", samples * len(tasks), seed=seed, tasks=tasks, fill=fill,
        num_questions=questions if conversation else 1,
    )  # fmt: skip
    jobs = [(s, b) for s in specs for b in (budgets if s.name != "full" else [1.0])]
    results = []
    options = {} if prefill_chunk is None else {"prefill_chunk": prefill_chunk}
    # one backend (and graphs) for all runs
    with pruning(model, Full(), compile=compile, **options):
        for spec, budget in tqdm(jobs, desc="eval", unit="run", disable=not ranks.main):
            policy = spec.build(budget)
            if conversation:
                stats = run_conversations(model, data, policy, batch_size=batch_size, ranks=ranks)
            else:
                stats = run_haystack(
                    model, data, policy, batch_size=batch_size, question_after=question_after,
                    ranks=ranks,
                )  # fmt: skip
            hits = [[c] if isinstance(c, bool) else c for c in stats.correct]
            for task in (*tasks, "all"):
                mine = [h for h, s in zip(hits, data, strict=True) if task in ("all", s.task)]
                flat = [c for h in mine for c in h]
                results.append(_row(spec, budget, task, sum(flat) / len(flat), len(flat), stats))
            if prefill_chunk is not None:
                results += _by_needle_chunk(spec, budget, data, hits, prefill_chunk, stats)
    return results


def _by_needle_chunk(spec, budget, data, hits, chunk: int, stats: RunStats) -> list[dict]:
    """Accuracy by the chunk of a streamed prompt its first question's needle is in (samples
    whose needle is known), in chunk order."""
    groups: dict[int, list[bool]] = {}
    for sample, hit in zip(data, hits, strict=True):
        focus = int(sample.focus[0])
        if focus >= 0:
            groups.setdefault(focus // chunk, []).append(hit[0])
    return [
        _row(spec, budget, f"chunk {k}", sum(h) / len(h), len(h), stats)
        for k, h in sorted(groups.items())
    ]


def _row(spec, budget, task, accuracy, n, stats: RunStats) -> dict:
    return {
        "policy": spec.label,
        "budget": budget,
        "task": task,
        "accuracy": round(accuracy, 4),
        "n": n,
        "kv_fraction": round(stats.kv_bytes / max(1, stats.full_kv_bytes), 4),
    }


def evaluate_milebench(
    model_dir: str, data_dir: str, datasets: list[str], specs, budgets, *, samples: int
) -> list[dict]:
    from csp_inductor.evaluation import milebench

    model, processor = milebench.load_model(model_dir)
    results = []
    jobs = [(s, b) for s in specs for b in (budgets if s.name != "full" else [1.0])]
    for spec, budget in tqdm(jobs, desc="milebench", unit="run"):
        with pruning(model, spec.build(budget)):
            for name in datasets:
                data = milebench.load_dataset(data_dir, name, limit=samples)
                predictions = milebench.run(model, processor, data, max_new_tokens=64)
                scored = milebench.score(name, predictions, data)
                results.append(
                    {
                        "policy": spec.label,
                        "budget": budget,
                        "task": name,
                        "accuracy": round(scored["score"], 4),
                        "metric": scored["metric"],
                        "n": scored["n"],
                    }
                )
    return results


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m csp_inductor eval", description=__doc__)
    p.add_argument("--bench", choices=("visualhaystack", "milebench"), default="visualhaystack")
    p.add_argument("--model", default=str(hs.BUILTIN_MODEL_PATH), help="local HF model dir")
    p.add_argument(
        "--policies",
        default="full,csp,snapkv,h2o,lookm,streamingllm",
        help="name[:key=value,...] separated by ';' (or by ',' when each has one option at "
        "most), e.g. 'csp:layers=pyramid,n=0;snapkv:layers=pyramid'",
    )
    p.add_argument("--budgets", default="0.05,0.1,0.2,0.4")
    p.add_argument("--samples", type=int, default=25, help="per task (milebench: per dataset)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--tasks", default=",".join(hs.TASKS), help="visualhaystack tasks")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--compile", action="store_true", help="torch.compile the decoder")
    p.add_argument(
        "--question-after",
        action="store_true",
        help="visualhaystack: prune the context before the question is seen, then ask it",
    )
    p.add_argument(
        "--mode",
        choices=("standard", "conversation"),
        default="standard",
        help="visualhaystack: conversation = prune each context once, then ask --questions "
        "questions about it in successive turns",
    )
    p.add_argument("--questions", type=int, default=4, help="conversation: questions per context")
    p.add_argument(
        "--prefill-chunk",
        type=int,
        default=None,
        help="visualhaystack: stream each prompt through the decoder this many tokens at a time "
        "(adds accuracy by the needle's chunk)",
    )
    p.add_argument(
        "--variant",
        choices=("dense", "sparse"),
        default="dense",
        help=f"visualhaystack: sparse = boards with {hs.SPARSE_FILL:.0%}% of cells non-empty",
    )
    p.add_argument("--data-dir", help="milebench: the directory holding the datasets")
    p.add_argument("--datasets", default="", help="milebench: comma-separated dataset names")
    p.add_argument(
        "--tp",
        action="store_true",
        help="under torchrun: split the model over the processes by tensor parallelism "
        "(every process answers every prompt) instead of sharing the prompts out",
    )
    p.add_argument("--json", help="write {'results': [...]} here")
    p.add_argument("--plot", help="write a PNG of accuracy vs budget (a panel per task) here")
    return p


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    specs = PolicySpec.parse_list(args.policies)
    budgets = [float(b) for b in args.budgets.split(",")]
    for b in budgets:
        if not 0 < b <= 1:
            p.error(f"--budgets: every budget must be in (0, 1], got {b}")
    if args.prefill_chunk is not None and args.prefill_chunk < 1:
        p.error(f"--prefill-chunk must be >= 1, got {args.prefill_chunk}")
    if args.questions < 1:
        p.error(f"--questions must be >= 1, got {args.questions}")
    if args.mode == "conversation" and args.question_after:
        p.error("--question-after is for --mode standard (a conversation asks after anyway)")
    ranks = Ranks.launched()
    if args.tp and ranks.size == 1:
        p.error("--tp splits the model over the processes of a launch: torchrun --nproc-per-node N")
    if args.bench == "milebench":
        if ranks.size > 1:
            p.error("--bench milebench runs in one process (no torchrun)")
        if not args.data_dir or not args.datasets:
            p.error("--bench milebench needs --data-dir and --datasets")
        results = evaluate_milebench(
            args.model, args.data_dir, args.datasets.split(","), specs, budgets,
            samples=args.samples,
        )  # fmt: skip
    else:
        model = hs.load_builtin_model(args.model, tp_plan="auto" if args.tp else None)
        tasks = tuple(t for t in args.tasks.split(",") if t)
        unknown = set(tasks) - set(hs.TASKS)
        if unknown:
            p.error(f"--tasks: unknown {sorted(unknown)}; known: {list(hs.TASKS)}")
        results = evaluate_haystack(
            model, specs, budgets, samples=args.samples, seed=args.seed, tasks=tasks,
            batch_size=args.batch_size, compile=args.compile, question_after=args.question_after,
            mode=args.mode, fill=hs.SPARSE_FILL if args.variant == "sparse" else 0.5,
            questions=args.questions, ranks=ALONE if args.tp else ranks,
            prefill_chunk=args.prefill_chunk,
        )  # fmt: skip
    if not ranks.main:
        return 0
    print(format_table(results))
    if args.json:
        meta = {k: v for k, v in vars(args).items() if k not in ("json", "plot")}
        if Path(args.model).resolve() == hs.BUILTIN_MODEL_PATH.resolve():
            meta["model"] = "builtin"  # not this machine's install path
        Path(args.json).write_text(json.dumps({"config": meta, "results": results}, indent=1))
    if args.plot:
        plot(results, args.plot)
    return 0
