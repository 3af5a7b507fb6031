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
import contextlib
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from csp_inductor.compile import compile as compile_model
from csp_inductor.compile import restore
from csp_inductor.distributed import ALONE, Ranks
from csp_inductor.evaluation import haystack as hs
from csp_inductor.policies import POLICIES, REREAD_WINDOW, Full, Oracle, Policy, make_policy


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


@contextlib.contextmanager
def pruning(model, policy: Policy, *, compiled: bool | None = None):
    """``model`` pruning with ``policy`` inside the block. A model already compiled by
    csp_inductor keeps its backend (and its compiled graphs: the policy is switched, not
    recompiled) and gets its previous policy back; otherwise it is compiled (``compiled``;
    None = eager) and restored."""
    backend = getattr(model, "csp_backend", None)
    if backend is not None and compiled is not None and compiled != backend.compile:
        raise ValueError(
            f"the model's backend has compile={backend.compile}, got compiled={compiled}; "
            "restore(model) first, or pass compiled=None to use the backend as it is"
        )
    if backend is None:
        compile_model(model, policy, compile=bool(compiled))
        try:
            yield model.csp_backend
        finally:
            restore(model)
        return
    previous, backend.policy = backend.policy, policy
    try:
        yield backend
    finally:
        backend.policy = previous


@dataclass
class RunStats:
    correct: list  # per sample: bool, or (conversations) a bool per question
    kv_bytes: int = 0  # summed over batches: bytes the pruned caches held
    full_kv_bytes: int = 0  # what full caches of the same prompts would hold


def run_haystack(
    model,
    samples: list[hs.Sample],
    policy: Policy,
    *,
    batch_size: int = 8,
    compiled: bool | None = None,
    question_after: bool = False,
    ranks: Ranks = ALONE,
) -> RunStats:
    """Greedy answers of ``model`` under ``policy`` for ``samples`` (batched, left-padded).
    ``ranks``: the processes that share the batches (each gets every ``size``-th batch, the
    same batches one process makes) and gather the results, on every rank.

    ``question_after``: prefill (and prune) the context alone, then feed the question and
    decode, so pruning cannot see the question and every answer token reads the pruned cache.
    By default the question is part of the prompt: the first answer token then comes from the
    (never pruned) prefill and only later tokens read the pruned cache. An :class:`Oracle`
    keeps each prompt's evidence.
    """
    stats = RunStats(correct=[None] * len(samples))
    order = sorted(range(len(samples)), key=lambda i: len(samples[i].input_ids))
    # with question_after, a batch holds one task: its questions have one length
    tasks = dict.fromkeys(s.task for s in samples) if question_after else [None]
    groups = [[i for i in order if task in (None, samples[i].task)] for task in tasks]
    chunks = [g[i : i + batch_size] for g in groups for i in range(0, len(g), batch_size)]
    with ranks.failing_together(), pruning(model, policy, compiled=compiled) as backend:
        for chunk in ranks.deal(chunks):
            batch = hs.collate([samples[i] for i in chunk])
            if isinstance(policy, Oracle):
                backend.policy = _with_evidence(policy, [samples[i] for i in chunk], question_after)
            if question_after:
                new = _generate_after_context(model, [samples[i] for i in chunk], 4)
            else:
                new = _generate(model, batch, max_new_tokens=4)
            cache = backend.cache
            stats.kv_bytes += cache.nbytes()
            real = int(batch["attention_mask"].sum(dim=1).max())
            stats.full_kv_bytes += len(chunk) * real * cache.kv_bytes_per_token()
            for i, ids in zip(chunk, new, strict=True):
                stats.correct[i] = hs.score(ids, samples[i])
    return _gathered(stats, ranks)


def _gathered(stats: RunStats, ranks: Ranks) -> RunStats:
    """Every rank's results of its share, merged (each sample was answered by one rank)."""
    parts = ranks.gather(stats)
    correct = [next((p.correct[i] for p in parts if p.correct[i] is not None), None)
               for i in range(len(stats.correct))]  # fmt: skip
    return RunStats(correct, sum(p.kv_bytes for p in parts), sum(p.full_kv_bytes for p in parts))


def _with_evidence(oracle: Oracle, samples: list[hs.Sample], context_only: bool) -> Oracle:
    """``oracle`` keeping the evidence of ``samples``: of their first question, or of every
    question and within the context alone (``context_only``)."""
    if context_only:
        return replace(oracle, positions=tuple(tuple(s.context_evidence.tolist()) for s in samples))
    return replace(oracle, positions=tuple(tuple(s.evidence.tolist()) for s in samples))


@torch.no_grad()
def _generate(model, batch, *, max_new_tokens: int, min_new_tokens: int = 0):
    out = model.generate(
        **batch,
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        do_sample=False,
        pad_token_id=hs.PAD_TOKEN_ID,
        eos_token_id=hs.EOS_TOKEN_ID,
    )
    return out[:, batch["input_ids"].shape[1] :]


@torch.no_grad()
def _generate_after_context(model, samples: list[hs.Sample], max_new_tokens: int):
    """Prefill the prompts without their (equally long) questions, then generate after them.
    The question is a conversation turn: pruned by the policy as a prompt of its length (the
    built-in questions, 4–9 tokens, are too short to prune)."""
    q = {hs.question_length(s) for s in samples}
    if len(q) != 1:
        raise ValueError(f"questions of one batch must have one length, got {sorted(q)}")
    q = q.pop()
    context = hs.collate([replace(s, input_ids=s.input_ids[:-q]) for s in samples])
    mask = context["attention_mask"]
    backend = model.csp_backend
    cache = backend.new_cache(decode_capacity=q + max_new_tokens)
    model(**context, position_ids=hs.position_ids(mask), **{backend.cache_arg: cache})
    ids = torch.cat([context["input_ids"], torch.stack([s.input_ids[-q:] for s in samples])], 1)
    mask = torch.cat([mask, mask.new_ones(len(samples), q)], 1)
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=hs.PAD_TOKEN_ID,
        eos_token_id=hs.EOS_TOKEN_ID,
        **{backend.cache_arg: cache},
    )
    return out[:, ids.shape[1] :]


def run_conversations(
    model, samples: list[hs.Sample], policy: Policy, *, batch_size: int = 8, ranks: Ranks = ALONE
) -> RunStats:
    """Each sample's context prefilled and pruned by ``policy``, then its questions (the first
    and the followups) asked one per turn on that cache, each answered greedily; an
    :class:`Oracle` gets each batch's ``context_evidence``. ``correct`` holds one list of
    per-question results per sample; the KV counts are the context's, kept and whole.
    ``ranks`` share the batches as in :func:`run_haystack`."""
    stats = RunStats(correct=[None] * len(samples))
    # a batch shares a task and a question count: its turns then have one length
    groups: dict[tuple[str, int], list[int]] = {}
    for i in sorted(range(len(samples)), key=lambda i: len(samples[i].input_ids)):
        groups.setdefault((samples[i].task, 1 + len(samples[i].followups)), []).append(i)
    chunks = [g[i : i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]
    with ranks.failing_together(), pruning(model, Full()) as backend:
        for chunk in ranks.deal(chunks):
            batch = [samples[i] for i in chunk]
            is_oracle = isinstance(policy, Oracle)
            backend.policy = _with_evidence(policy, batch, True) if is_oracle else policy
            answers, kept = _converse(model, batch)
            real = [len(s.input_ids) - hs.question_length(s) for s in batch]
            per_token = backend.cache.kv_bytes_per_token()
            stats.kv_bytes += sum(kept) * per_token
            stats.full_kv_bytes += sum(real) * per_token
            for i, s, got in zip(chunk, batch, answers, strict=True):
                expected = [s.answer_ids, *(a for _, a in s.followups)]
                stats.correct[i] = [
                    hs.decode(ids) == hs.decode(want)
                    for ids, want in zip(got, expected, strict=True)
                ]
    return _gathered(stats, ranks)


@torch.no_grad()
def _converse(model, samples: list[hs.Sample]) -> tuple[list[list[torch.Tensor]], list[int]]:
    """One batch's conversations: the context pruned by the backend's policy, then one turn per
    question, kept whole (the previous answer's last token, ``<eos>``, the question). Returns
    each row's answers (token ids) and its kept context tokens."""
    backend = model.csp_backend
    q = hs.question_length(samples[0])
    questions = [[s.input_ids[-q:], *(fq for fq, _ in s.followups)] for s in samples]
    answer_len = [len(a) for a in [samples[0].answer_ids, *(a for _, a in samples[0].followups)]]
    context = hs.collate([replace(s, input_ids=s.input_ids[:-q]) for s in samples])
    ids, mask = context["input_ids"], context["attention_mask"]
    cache = backend.new_cache(decode_capacity=sum(q + a + 2 for a in answer_len))
    model(**context, position_ids=hs.position_ids(mask), **{backend.cache_arg: cache})
    kept = cache.kept_prompt
    policy, backend.policy = backend.policy, Full()
    try:
        answers: list[list[torch.Tensor]] = [[] for _ in samples]
        for turn, length in enumerate(answer_len):
            new = torch.stack([qs[turn] for qs in questions])
            if turn:  # the previous answer's last token is fed with the turn, then <eos>
                new = torch.cat([new.new_full((len(samples), 1), hs.EOS_TOKEN_ID), new], dim=1)
            ids = torch.cat([ids, new], dim=1)
            mask = torch.cat([mask, mask.new_ones(new.shape)], dim=1)
            out = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=length, do_sample=False,
                pad_token_id=hs.PAD_TOKEN_ID, eos_token_id=hs.EOS_TOKEN_ID,
                **{backend.cache_arg: cache},
            )  # fmt: skip
            got = out[:, ids.shape[1] :]
            short = length - got.shape[1]  # every row ended early
            got = torch.cat([got, got.new_full((len(samples), short), hs.PAD_TOKEN_ID)], dim=1)
            for row, tokens in zip(answers, got, strict=True):
                row.append(tokens)
            ids, mask = torch.cat([ids, got], dim=1), torch.cat([mask, mask.new_ones(got.shape)], 1)
    finally:
        backend.policy = policy
    return answers, kept


def decode_speed(
    model, sample: hs.Sample, policy: Policy, *, new_tokens: int = 32, compiled: bool | None = None
):
    """Decode tokens/s of one prompt: (time of prefill + ``new_tokens``) − (time of prefill + 1),
    each the best of two runs; also returns the cache bytes held."""
    batch = hs.collate([sample])
    with pruning(model, policy, compiled=compiled) as backend:
        times = {}
        for n in (1, new_tokens + 1):
            best = float("inf")
            for _ in range(2):
                start = time.perf_counter()
                _generate(model, batch, max_new_tokens=n, min_new_tokens=n)
                best = min(best, time.perf_counter() - start)
            times[n] = best
        held = backend.cache.nbytes()
    return new_tokens / max(1e-9, times[new_tokens + 1] - times[1]), held


def evaluate_haystack(
    model,
    specs: list[PolicySpec],
    budgets: list[float],
    *,
    samples: int,
    seed: int,
    tasks: tuple[str, ...] = hs.TASKS,
    batch_size: int = 8,
    compiled: bool = False,
    question_after: bool = False,
    mode: str = "standard",
    fill: float = 0.5,
    questions: int = 4,
    ranks: Ranks = ALONE,
) -> list[dict]:
    """Accuracy rows per policy × budget × task (and "all"). ``mode="conversation"`` asks up
    to ``questions`` questions per context (:func:`run_conversations`; accuracy over all of
    them); ``fill`` is the boards' chance of a non-empty cell (``hs.SPARSE_FILL``: sparse).
    ``ranks`` share the batches (data parallel); every rank returns the same rows."""
    conversation = mode == "conversation"
    data = hs.make_split(
        "test", samples * len(tasks), seed=seed, tasks=tasks, fill=fill,
        num_questions=questions if conversation else 1,
    )  # fmt: skip
    jobs = [(s, b) for s in specs for b in (budgets if s.name != "full" else [1.0])]
    results = []
    with pruning(model, Full(), compiled=compiled):  # one backend (and graphs) for all runs
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
    return results


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


def format_table(results: list[dict]) -> str:
    tasks = list(dict.fromkeys(r["task"] for r in results))
    runs = list(dict.fromkeys((r["policy"], r["budget"]) for r in results))
    cell = {(r["policy"], r["budget"], r["task"]): r["accuracy"] for r in results}
    head = f"{'policy':<28}{'budget':>7}" + "".join(f"{t:>14}" for t in tasks)
    lines = [head, "-" * len(head)]
    for policy, budget in runs:
        vals = "".join(f"{cell.get((policy, budget, t), float('nan')):>14.3f}" for t in tasks)
        lines.append(f"{policy:<28}{budget:>7.2f}{vals}")
    return "\n".join(lines)


def plot(results: list[dict], path: str) -> None:
    """Accuracy vs budget, one panel per task (and ``all``), one line per policy; ``full`` is a
    dashed horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in results))
    budgets = sorted({r["budget"] for r in results if r["policy"] != "full"})
    cols = min(3, len(tasks))
    rows_n = -(-len(tasks) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.4 * rows_n), squeeze=False)
    for ax, task in zip(axes.flat, tasks, strict=False):
        rows = [r for r in results if r["task"] == task]
        for i, policy in enumerate(dict.fromkeys(r["policy"] for r in rows)):
            pts = sorted((r["budget"], r["accuracy"]) for r in rows if r["policy"] == policy)
            if policy == "full":
                ax.axhline(pts[0][1], color="black", ls="--", lw=1, label="full cache")
            else:
                ax.plot(*zip(*pts, strict=True), marker="o", color=f"C{i}", label=policy)
        ax.set_xscale("log")
        ax.set_xticks(budgets, [f"{b:g}" for b in budgets])
        ax.minorticks_off()
        ax.set_title(task, fontsize=10)
        ax.set_xlabel("KV budget (fraction of the prompt kept)", fontsize=8)
        ax.set_ylabel("accuracy", fontsize=8)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(tasks) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower right", fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m csp_inductor eval", description=__doc__)
    p.add_argument("--bench", choices=("visualhaystack", "milebench"), default="visualhaystack")
    p.add_argument("--model", default=str(hs.BUILTIN_MODEL_PATH), help="local HF model dir")
    p.add_argument("--policies", default="full,csp,snapkv,h2o,lookm,streamingllm")
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
        "--variant",
        choices=("dense", "sparse"),
        default="dense",
        help=f"visualhaystack: sparse = boards with {hs.SPARSE_FILL:.0%} of cells non-empty",
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
    args = p.parse_args(argv)
    specs = [PolicySpec.parse(s) for s in args.policies.split(",") if s.strip()]
    budgets = [float(b) for b in args.budgets.split(",")]
    for b in budgets:
        if not 0 < b <= 1:
            p.error(f"--budgets: every budget must be in (0, 1], got {b}")
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
            batch_size=args.batch_size, compiled=args.compile, question_after=args.question_after,
            mode=args.mode, fill=hs.SPARSE_FILL if args.variant == "sparse" else 0.5,
            questions=args.questions, ranks=ALONE if args.tp else ranks,
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
