"""Decomposed self/cross window scores and the n-softmax: the public functions and the CPU path.

The CPU path never forms an (seq, seq) matrix. It walks the ``W`` window queries in row chunks
sized to a fixed memory budget; each chunk holds complete causal rows, so the row's
log-sum-exp, the n-softmax weight ``w_i = sigmoid(LSE_i - ln n)`` and the column sums split by
query modality all come from one pass. The GQA group sum is folded into the same contraction::

    acc[b, h, m, j] += Σ_{g, i in chunk} exp(s[b, h, g, i, j] - LSE) · w · [modality(i) == m]

When the prefill's attention kernel returned the rows' log-sum-exp, it is used as given (no
maxima or sums recomputed) and only the keys before the always-kept recent window are scored.

Peak extra memory is one chunk of logits (``chunk_elements`` fp32 values, 16 MiB by default)
plus the (batch, kv_heads, 2, seq) fp32 output: O(H·L), independent of ``W``.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from . import reference
from .compiled import Fused

BACKENDS = ("auto", "reference", "torch", "triton")
DEFAULT_CHUNK_ELEMENTS = 1 << 22
# The window pass runs its exponentials as an Inductor kernel for chunks of at least this many
# logits (a 4k-token prompt's, at 64 logit columns); below, the kernel's first compilation
# (seconds) costs more than it saves
FUSED_MIN_LOGITS = 1 << 18


def n_softmax(x: Tensor, n: float = 1.0, dim: int = -1) -> Tensor:
    """``softmax_n(x) = exp(x) / (n + Σ exp(x))`` along ``dim``, numerically stable.

    ``n = 0`` is the ordinary softmax. Computed in fp32 (fp64 stays fp64) as
    ``exp(x - LSE) · sigmoid(LSE - ln n)``, which neither overflows for large ``x`` nor for
    large ``n``; the result has ``x``'s dtype. A row that is entirely ``-inf`` gives zeros.
    CUDA tensors go through the registered op (a fused Triton kernel when available).
    """
    _check_n(n)
    if x.is_cuda:
        return torch.ops.csp_inductor.n_softmax(x, float(n), dim)
    return n_softmax_torch(x, n, dim)


def n_softmax_torch(x: Tensor, n: float = 1.0, dim: int = -1) -> Tensor:
    """The pure-torch n-softmax (see :func:`n_softmax`)."""
    xf = x if x.dtype == torch.float64 else x.float()
    lse = torch.logsumexp(xf, dim=dim, keepdim=True)
    lse = lse.clamp_min(torch.finfo(xf.dtype).min)  # an all -inf row gives zeros, not NaN
    out = torch.exp(xf - lse) * torch.sigmoid(lse - _log(n))
    return out.to(x.dtype)


def _log(n: float) -> float:
    return math.log(n) if n > 0 else -math.inf


def _check_n(n: float) -> None:
    if not (isinstance(n, (int, float)) and n >= 0 and math.isfinite(n)):
        raise ValueError(f"n must be a finite number >= 0 (0 = ordinary softmax), got n={n!r}")


def decomposed_scores(
    q_window: Tensor,
    k: Tensor,
    is_image: Tensor,
    *,
    n: float = 1.0,
    scale: float | None = None,
    key_padding: Tensor | None = None,
    window_mask: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """CSP's decomposed window scores, (batch, kv_heads, 2, seq) fp32.

    ``[:, :, 0]`` is the self (intra-modality) score, ``[:, :, 1]`` the cross score.

    Args:
        q_window: (batch, q_heads, W, head_dim), the last ``W`` prompt queries, RoPE applied.
        k: (batch, kv_heads, seq, head_dim); ``q_heads`` must be a multiple of ``kv_heads``.
        is_image: (batch, seq) bool, True for visual tokens.
        n: the n-softmax parameter (0 = ordinary softmax).
        scale: logit scale; None = ``1 / sqrt(head_dim)``.
        key_padding: (batch, seq) bool, True = padding; None = no padding.
        window_mask: (batch, W) bool, which window queries count; None = all of them.
            Queries at padding positions never count.
        backend: ``"auto"`` (the registered op: Triton on CUDA, the chunked torch path on CPU),
            ``"reference"`` (dense, for testing), ``"torch"`` or ``"triton"`` (on CPU tensors
            only under ``TRITON_INTERPRET=1``).
    """
    _check_scoring_inputs(q_window, k, is_image, key_padding, window_mask)
    _check_n(n)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got backend={backend!r}")
    scale = 1.0 / math.sqrt(q_window.shape[-1]) if scale is None else float(scale)
    if backend == "reference":
        return reference.decomposed_scores(
            q_window, k, is_image, n=n, scale=scale, key_padding=key_padding,
            window_mask=window_mask,
        ).float()  # fmt: skip
    if backend == "torch":
        return decomposed_scores_torch(q_window, k, is_image, n, scale, key_padding, window_mask)
    if backend == "triton":
        if not q_window.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                "backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before "
                f"Triton is imported to run on {q_window.device.type} tensors"
            )
        from .kernels.decomposed_scores import decomposed_scores_triton

        return decomposed_scores_triton(q_window, k, is_image, n, scale, key_padding, window_mask)
    return torch.ops.csp_inductor.decomposed_scores(
        q_window, k, is_image, float(n), scale, key_padding, window_mask
    )


def decomposed_scores_torch(
    q_window: Tensor,
    k: Tensor,
    is_image: Tensor,
    n: float,
    scale: float,
    key_padding: Tensor | None,
    window_mask: Tensor | None,
    lse: Tensor | None = None,
    columns: int | None = None,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> Tensor:
    """The chunked torch path of :func:`decomposed_scores` (arguments already validated).

    ``lse`` (batch, q_heads, W) fp32: the window rows' log-sum-exp when the attention that
    computed them returned it (the prefill's causal kernel does); the rows' maxima and sums
    are then not recomputed. A row that does not count (padding, outside ``window_mask``)
    contributes nothing whatever its given value.
    ``columns`` (with ``lse`` only): score the first ``columns`` keys, the others get 0 (the
    keys a policy keeps anyway, its recent window, need no score)."""
    _, scores = _window_pass(
        q_window, k, None, is_image, n, scale, key_padding, window_mask, lse, columns,
        chunk_elements,
    )  # fmt: skip
    return scores


def window_attention_torch(
    q_window: Tensor,
    k: Tensor,
    v: Tensor,
    is_image: Tensor,
    n: float,
    scale: float,
    key_padding: Tensor | None,
    window_mask: Tensor | None,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> tuple[Tensor, Tensor]:
    """The causal attention of the prompt's last ``W`` queries and their decomposed scores,
    from one set of logits: the prefill then needs its fast kernel for the other rows only.

    Returns the rows' output (batch, q_heads, W, head_dim) in ``q_window``'s dtype, and the
    scores :func:`decomposed_scores_torch` gives for the same arguments (the same operations
    in the same order: equal to the last bit). Padding keys are masked for every row; a row
    with no key to attend (a padding query with only padding before it) gets zeros, not the
    don't-care value an unmasked padding query gets from the prefill's kernel."""
    return _window_pass(
        q_window, k, v, is_image, n, scale, key_padding, window_mask, None, None,
        chunk_elements,
    )  # fmt: skip


def _window_pass(
    q_window: Tensor,
    k: Tensor,
    v: Tensor | None,
    is_image: Tensor,
    n: float,
    scale: float,
    key_padding: Tensor | None,
    window_mask: Tensor | None,
    lse: Tensor | None,
    columns: int | None,
    chunk_elements: int,
) -> tuple[Tensor | None, Tensor]:
    """The chunked window pass: the rows' attention output when the values ``v`` are given
    (None otherwise; with ``lse`` they cannot be), and the decomposed scores."""
    assert v is None or lse is None, "the rows' output needs their own maxima and sums"
    b, hq, w, d = q_window.shape
    hkv, full = k.shape[1], k.shape[2]
    seq = full if lse is None or columns is None else columns
    k = k[:, :, :seq]
    group = hq // hkv
    device = k.device
    # Logits are formed transposed, (seq, group·rows) = K·Qᵀ per KV head; the per-key
    # accumulation is then a product with the rows' weights.
    keys = k.float()
    values = None if v is None else v.float()
    queries = (q_window.float() * scale).view(b, hkv, group, w, d)
    out = None
    if v is not None:
        out = torch.empty(b, hkv, group, w, v.shape[-1], dtype=torch.float32, device=device)
    pad, rows_onehot = _row_modalities(is_image, key_padding, window_mask, w, device)
    key_pos = torch.arange(seq, device=device)
    log_n = _log(n)
    row_lse = None if lse is None else lse.view(b, hkv, group, w)

    # per key: the n-softmax weight it gets from image queries (row 0) and from text ones (1)
    acc = torch.zeros(b, hkv, 2, seq, dtype=torch.float32, device=device)
    # chunks of whole rows, at most 64 logit columns (group·rows) per matmul and a bounded
    # number of logits in memory; one (batch, KV head) at a time: oneDNN's linear is measured
    # ~2x faster than the batched matmul for the (seq, 64) x (64, 64·) products on CPU, and
    # one head's logits stay in the last-level cache for the passes that follow
    chunk = max(1, min(w, 64 // group, chunk_elements // max(1, group * seq)))
    fused = device.type == "cpu"
    for start in range(0, w, chunk):
        stop = min(w, start + chunk)
        c = stop - start
        # the CPU kernel for chunks large enough (and not of a single column, a size Dynamo
        # would specialise a graph for)
        big = fused and group * c > 1 and seq * group * c >= FUSED_MIN_LOGITS
        exp_shifted_ = _fused_exp_shifted_ if big else _exp_shifted_
        # causality only bites in the keys after the chunk's first query
        first = full - w + start + 1
        q_pos = torch.arange(full - w + start, full - w + stop, device=device)
        future = key_pos[first:, None, None] > q_pos  # (seq - first, 1, c)
        for i in range(b):
            for j in range(hkv):
                rows = queries[i, j, :, start:stop].reshape(group * c, d)
                # (seq, g·c): the logits, which become the rows' exponentials in place
                probs = F.linear(keys[i, j], rows)
                probs.view(seq, group, c)[first:].masked_fill_(future, -math.inf)
                if key_padding is not None:
                    probs.masked_fill_(pad[i, :seq, None], -math.inf)
                given = None if row_lse is None else row_lse[i, j, :, start:stop].reshape(group * c)
                weight, total = _exponentiate_(probs, given, log_n, exp_shifted_)
                if out is not None:
                    rows_out = probs.T @ values[i, j]
                    norm = torch.where(total > 0, total.reciprocal(), 0.0)
                    out[i, j, :, start:stop] = (rows_out * norm[:, None]).view(group, c, -1)
                # (seq, g·c) x (g·c,) per modality: ~2.5x faster than one (2, g·c) x (g·c, seq)
                # product, measured on CPU
                coef = weight.view(group, c, 1) * rows_onehot[i, None, start:stop]
                for m in range(2):
                    acc[i, j, m].addmv_(probs, coef[..., m].reshape(group * c))
    scores = _self_cross(acc, is_image, full)
    if out is None:
        return None, scores
    return out.view(b, hq, w, -1).to(q_window.dtype), scores


def _row_modalities(
    is_image: Tensor, key_padding: Tensor | None, window_mask: Tensor | None, w: int, device
) -> tuple[Tensor, Tensor]:
    """The key padding (all False when None) and, per window row, a one-hot (batch, W, 2) of
    the accumulator its weight goes to: 0 for an image query, 1 for a text one (none for a
    row that does not count)."""
    b, full = is_image.shape
    pad = key_padding
    if pad is None:
        pad = torch.zeros(b, full, dtype=torch.bool, device=device)
    rows_valid = ~pad[:, full - w :]
    if window_mask is not None:
        rows_valid = rows_valid & window_mask
    rows_img = is_image[:, full - w :]
    # per window row: its weight goes to accumulator 0 if it is an image query, else 1
    return pad, torch.stack([rows_img, ~rows_img], dim=-1) & rows_valid[..., None]


def _exponentiate_(
    probs: Tensor, lse: Tensor | None, log_n: float, exp_shifted_
) -> tuple[Tensor, Tensor | None]:
    """In place: the chunk's logits (seq, rows) become their exponentials, shifted by the rows'
    maxima, or by their log-sum-exp ``lse`` when given. Returns each row's n-softmax weight per
    exponential and, without ``lse``, the rows' sums."""
    if lse is None:
        # P·total = exp(s - max), LSE = max + log(total)
        row_max = probs.amax(dim=0).clamp_min(torch.finfo(torch.float32).min)
        exp_shifted_(probs, row_max)
        total = probs.sum(dim=0)  # 0 for a fully masked row
        chunk_lse = row_max + total.log()
        # a fully masked row (a padding query) has total = 0 and contributes nothing
        return torch.where(total > 0, torch.sigmoid(chunk_lse - log_n) / total, 0.0), total
    # no inf - inf
    chunk_lse = torch.where(lse.isfinite(), lse, math.inf)
    exp_shifted_(probs, chunk_lse)
    return torch.sigmoid(chunk_lse - log_n), None


def _self_cross(acc: Tensor, is_image: Tensor, full: int) -> Tensor:
    """Self/cross scores (batch, kv_heads, 2, full) from the per-key sums of image and text
    queries (batch, kv_heads, 2, seq), by each key's modality; keys past ``seq`` score 0."""
    seq = acc.shape[-1]
    c_img, c_txt = acc.unbind(dim=2)
    key_img = is_image[:, None, :seq]
    scores = torch.stack(
        [torch.where(key_img, c_img, c_txt), torch.where(key_img, c_txt, c_img)], dim=2
    )
    return torch.nn.functional.pad(scores, (0, full - seq))


def _exp_shifted_(logits: Tensor, shift: Tensor) -> None:
    """In place: ``logits`` (seq, cols) fp32 become ``exp(logit - shift[col])``."""
    logits.sub_(shift).exp_()


# the CPU kernel: measured ~2.5x faster than eager's two passes for a (16384, 64) chunk
_fused_exp_shifted_ = Fused(_exp_shifted_, "the scoring's exponentials")


def _check_scoring_inputs(
    q_window: Tensor,
    k: Tensor,
    is_image: Tensor,
    key_padding: Tensor | None,
    window_mask: Tensor | None,
) -> None:
    if q_window.dim() != 4 or k.dim() != 4:
        raise ValueError(
            "q_window must be (batch, q_heads, W, head_dim) and k (batch, kv_heads, seq, "
            f"head_dim), got q_window.shape={tuple(q_window.shape)}, k.shape={tuple(k.shape)}"
        )
    b, hq, w, d = q_window.shape
    bk, hkv, seq, dk = k.shape
    if bk != b or dk != d:
        raise ValueError(
            "q_window and k must agree on batch and head_dim, got "
            f"q_window.shape={tuple(q_window.shape)}, k.shape={tuple(k.shape)}"
        )
    if hkv == 0 or hq % hkv:
        raise ValueError(f"q_heads={hq} must be a positive multiple of kv_heads={hkv}")
    if w > seq:
        raise ValueError(f"the window W={w} cannot exceed the sequence length seq={seq}")
    for name, mask, shape in (
        ("is_image", is_image, (b, seq)),
        ("key_padding", key_padding, (b, seq)),
        ("window_mask", window_mask, (b, w)),
    ):
        if mask is None:
            continue
        if tuple(mask.shape) != shape or mask.dtype != torch.bool:
            raise ValueError(
                f"{name} must be a bool tensor of shape {shape}, got "
                f"shape={tuple(mask.shape)} dtype={mask.dtype}"
            )
