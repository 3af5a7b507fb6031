"""The harness's runs: a model pruning with a policy over VisualHaystack samples, batched and
greedy, one question per prompt (:func:`run_haystack`) or a conversation of questions on one
pruned context (:func:`run_conversations`); the answers' accuracy and the caches' bytes, shared
out over processes and gathered; and the decode speed of one prompt."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, replace

import torch

from csp_inductor.compile import compile as compile_model
from csp_inductor.compile import restore
from csp_inductor.distributed import ALONE, Ranks
from csp_inductor.evaluation import haystack as hs
from csp_inductor.policies import Full, Oracle, Policy


@contextlib.contextmanager
def pruning(model, policy: Policy, *, compile: bool | None = None, **options):
    """``model`` pruning with ``policy`` inside the block. A model already compiled by
    csp_inductor keeps its backend (and its compiled graphs: the policy is switched, not
    recompiled) and gets its previous policy back; otherwise it is compiled (``compile``;
    None = eager; ``options``: :func:`csp_inductor.compile`'s others) and restored."""
    backend = getattr(model, "csp_backend", None)
    if backend is not None and options:
        raise ValueError(
            f"the model already has a backend, with its options; got {options}: restore(model) "
            "first"
        )
    if backend is not None and compile is not None and compile != backend.compile:
        raise ValueError(
            f"the model's backend has compile={backend.compile}, got compile={compile}; "
            "restore(model) first, or pass compile=None to use the backend as it is"
        )
    if backend is None:
        compile_model(model, policy, compile=bool(compile), **options)
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
    compile: bool | None = None,
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
    with ranks.failing_together(), pruning(model, policy, compile=compile) as backend:
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
    model, sample: hs.Sample, policy: Policy, *, new_tokens: int = 32, compile: bool | None = None
):
    """Decode tokens/s of one prompt: (time of prefill + ``new_tokens``) − (time of prefill + 1),
    each the best of two runs; also returns the cache bytes held."""
    batch = hs.collate([sample])
    with pruning(model, policy, compile=compile) as backend:
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
