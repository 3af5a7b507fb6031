"""Helpers shared by the tests and the benchmarks: random prompts, the reference selection of
every policy, the authors' ``softmax_n`` and the authors' dense scoring."""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from . import reference
from .budget import Budget
from .policies import CSP, H2O, KNorm, LookM, Policy, RandomKeep, SnapKV, StreamingLLM


@dataclass
class RandomPrompt:
    """One layer's worth of random prompt tensors (see :func:`random_prompt`)."""

    q: Tensor  # (batch, q_heads, seq, head_dim)
    k: Tensor  # (batch, kv_heads, seq, head_dim)
    is_image: Tensor  # (batch, seq) bool
    key_padding: Tensor | None  # (batch, seq) bool, left padding


LAYOUTS = ("mixed", "text", "image", "blocks")


def random_prompt(
    batch: int = 1,
    q_heads: int = 4,
    kv_heads: int = 2,
    seq: int = 64,
    head_dim: int = 16,
    *,
    pads: list[int] | None = None,
    layout: str = "blocks",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> RandomPrompt:
    """Random queries/keys with a modality layout:

    ``"text"`` / ``"image"``: one modality only; ``"mixed"``: each token independently;
    ``"blocks"``: runs of image tokens between text, as interleaved multi-image prompts have.
    ``pads[b]`` left-padding positions in row ``b`` (None = no padding).
    """
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_heads, seq, head_dim, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, seq, head_dim, generator=gen, dtype=torch.float64)
    # a few strongly attended keys so scores are spread out, as in real attention
    k[:, :, torch.randint(seq, (max(1, seq // 8),), generator=gen)] *= 3
    if layout == "text":
        is_image = torch.zeros(batch, seq, dtype=torch.bool)
    elif layout == "image":
        is_image = torch.ones(batch, seq, dtype=torch.bool)
    elif layout == "mixed":
        is_image = torch.rand(batch, seq, generator=gen) < 0.5
    elif layout == "blocks":
        period = max(2, seq // 5)
        is_image = ((torch.arange(seq) % period) < period * 2 // 3).expand(batch, seq).clone()
    else:
        raise ValueError(f"layout must be one of {LAYOUTS}, got layout={layout!r}")
    key_padding = None
    if pads is not None:
        key_padding = torch.arange(seq)[None, :] < torch.tensor(pads)[:, None]
    dev = torch.device(device)
    return RandomPrompt(
        q.to(dtype).to(dev),
        k.to(dtype).to(dev),
        is_image.to(dev),
        None if key_padding is None else key_padding.to(dev),
    )


def reference_select(
    policy: Policy,
    q: Tensor,
    k: Tensor,
    is_image: Tensor,
    key_padding: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """``policy.select`` computed the slow way: each sequence on its own, unpadded, with dense
    fp64 scores and Python ranking (:mod:`csp_inductor.reference`), shifted back by its padding."""
    batch, _, seq, head_dim = q.shape
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    rows = []
    for b in range(batch):
        pad = 0 if key_padding is None else int(key_padding[b].sum())
        qb, kb = q[b : b + 1, :, pad:].double(), k[b : b + 1, :, pad:].double()
        img = is_image[b : b + 1, pad:]
        budget = policy.budget_for(seq - pad)
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
        raise TypeError(f"no reference for policy {type(policy).__name__}")
    return [reference.ranked_keep(s.tolist(), budget, 0, first=first) for s in score]


def _random_rows(policy: RandomKeep, heads: int, length: int, budget: Budget) -> list[list[int]]:
    # The random scores are drawn for the padded batch; the reference draws them the same way
    # for a batch of one, so only compare RandomKeep on unpadded batches of one.
    score = torch.rand(1, heads, length, generator=torch.Generator().manual_seed(policy.seed))[0]
    return [reference.ranked_keep(s.tolist(), budget, 0) for s in score]


def authors_softmax_n():
    """``softmax_n`` from ``flash-attention-softmax-n``, the package the CSP authors used.

    Its package ``__init__`` imports a CUDA-only Triton module when Triton is installed, so the
    pure-torch function is loaded from its own file.
    """
    spec = importlib.util.find_spec("flash_attention_softmax_n")
    if spec is None or spec.origin is None:
        raise ImportError("flash-attention-softmax-n is not installed (pip install .[test])")
    path = Path(spec.origin).parent / "core" / "functional.py"
    module_spec = importlib.util.spec_from_file_location("_softmax_n_functional", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.softmax_n


def authors_dense_scores(
    q: Tensor, k: Tensor, is_image: Tensor, window: int, n: float = 1.0
) -> Tensor:
    """The authors' approach, for benchmarks: the full (batch, heads, seq, seq) causal logits of
    every prompt query, an fp32 n-softmax copy of them, then masked sums over the window rows.
    Returns (batch, kv_heads, 2, seq) like :func:`csp_inductor.decomposed_scores`."""
    b, hq, seq, d = q.shape
    hkv = k.shape[1]
    keys = k.repeat_interleave(hq // hkv, dim=1)
    logits = (q @ keys.transpose(-1, -2)) / math.sqrt(d)
    causal = torch.ones(seq, seq, dtype=torch.bool, device=q.device).tril()
    logits = logits.masked_fill(~causal, -math.inf)
    probs = reference.n_softmax(logits.float(), n=n)[:, :, seq - window :]
    q_img = is_image[:, None, seq - window :, None].float()
    c_img = (probs * q_img).sum(2).view(b, hkv, -1, seq).sum(2)
    c_txt = (probs * (1 - q_img)).sum(2).view(b, hkv, -1, seq).sum(2)
    key_img = is_image[:, None]
    return torch.stack(
        [torch.where(key_img, c_img, c_txt), torch.where(key_img, c_txt, c_img)], dim=2
    )
