"""The CSP authors' baselines: their ``softmax_n`` and their dense scoring."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import torch
from torch import Tensor

from .. import reference


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
