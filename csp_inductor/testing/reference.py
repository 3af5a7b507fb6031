"""The reference selection of every policy the executable specification covers: each
sequence on its own, with dense fp64 scores and Python ranking (:mod:`csp_inductor.reference`)."""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import Tensor

from .. import reference
from ..budget import Budget
from ..policies import CSP, H2O, Full, KNorm, LookM, Policy, RandomKeep, SnapKV, StreamingLLM

# the policies (and their subclasses) reference_select covers; LookM is an H2O with a text prior
COVERED = (Full, CSP, StreamingLLM, H2O, LookM, SnapKV, KNorm, RandomKeep)


def reference_select(
    policy: Policy,
    q: Tensor,
    k: Tensor,
    is_image: Tensor,
    key_padding: Tensor | None = None,
    scale: float | None = None,
    kept: list[int] | None = None,
) -> Tensor:
    """``policy.select`` computed the slow way: each sequence on its own, unpadded, with dense
    fp64 scores and Python ranking (:mod:`csp_inductor.reference`), shifted back by its padding
    (keeping ``kept[b]`` tokens of row ``b`` when given, as a layer of its own count does).

    Raises TypeError for a policy that is not one of :data:`COVERED` (KVzip, Oracle, a
    kvpress bridge, …), whatever its budget: there is no reference to compare it with."""
    if not isinstance(policy, COVERED):
        raise _not_covered(policy)
    batch, _, seq, head_dim = q.shape
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    rows = []
    for b in range(batch):
        pad = 0 if key_padding is None else int(key_padding[b].sum())
        qb, kb = q[b : b + 1, :, pad:].double(), k[b : b + 1, :, pad:].double()
        img = is_image[b : b + 1, pad:]
        length = seq - pad
        budget = policy.budget_for(length) if kept is None else policy.budget_kept(length, kept[b])
        per_head = _reference_rows(policy, qb, kb, img, budget, scale)
        rows.append([[j + pad for j in r] for r in per_head])
    return reference.pad_rows(rows)


def _reference_rows(policy, q, k, img, budget: Budget, scale: float) -> list[list[int]]:
    heads, length = k.shape[1], k.shape[2]
    if budget.keep_all:
        return [list(range(length))] * heads
    window = q[:, :, length - budget.window :]
    if isinstance(policy, CSP):
        scores = reference.decomposed_scores(window, k, img, n=policy.n, scale=scale)[0]
        if not policy.faithful and not bool(img.any()):
            budget = replace(budget, k_self=budget.k_self + budget.k_cross, k_cross=0)
        return [
            reference.csp_keep(
                s[0].tolist(), s[1].tolist(), budget, 0,
                sink_tokens=policy.sink_tokens, faithful=policy.faithful,
            )
            for s in scores
        ]  # fmt: skip
    first = None
    if isinstance(policy, StreamingLLM):
        score = torch.arange(length, 0, -1).double().expand(heads, -1)
    elif isinstance(policy, H2O):  # LookM included
        score = reference.column_softmax_sums(q, k, scale=scale)[0]
        if isinstance(policy, LookM):
            first = (~img[0]).tolist()
    elif isinstance(policy, SnapKV):
        sums = reference.column_softmax_sums(window, k, scale=scale)
        score = reference.snapkv_pool(sums, budget.window, policy.kernel_size)[0]
    elif isinstance(policy, KNorm):
        score = -k[0].norm(dim=-1)
    elif isinstance(policy, RandomKeep):
        return _random_rows(policy, heads, length, budget)
    else:
        raise _not_covered(policy)
    return [reference.ranked_keep(s.tolist(), budget, 0, first=first) for s in score]


def _random_rows(policy: RandomKeep, heads: int, length: int, budget: Budget) -> list[list[int]]:
    # The random scores are drawn for the padded batch; the reference draws them the same way
    # for a batch of one, so only compare RandomKeep on unpadded batches of one.
    score = torch.rand(1, heads, length, generator=torch.Generator().manual_seed(policy.seed))[0]
    return [reference.ranked_keep(s.tolist(), budget, 0) for s in score]


def _not_covered(policy: Policy) -> TypeError:
    covered = ", ".join(cls.__name__ for cls in COVERED)
    return TypeError(
        f"reference_select has no reference for policy {type(policy).__name__}; it covers "
        f"{covered} and their subclasses"
    )
