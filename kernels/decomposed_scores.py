"""Fused CSP window scores: two Triton passes, no (seq, seq) matrix, no atomics.

Math (CSP_SPEC.md, "Scoring"). For batch ``b``, query head ``h`` of KV head ``g(h)``, window
row ``i`` at position ``t_i = L - W + i`` and key ``j``::

    s[i, j]  = scale · q_i · k_j            (-inf for j > t_i and for padding keys)
    LSE_i    = logsumexp_j s[i, j]          over the whole causal row
    w_i      = sigmoid(LSE_i - ln n)        (n = 0: w_i = 1)
    A[i, j]  = exp(s[i, j] - LSE_i) · w_i   = exp(s[i, j] - shift_i),  shift_i = LSE_i - ln w_i
    C_m[j]   = Σ_{h in group, i: modality(t_i) = m, row i counts} A[i, j]
    self[j]  = C_{modality(j)}[j],  cross[j] = C_{other modality}[j]

A row counts unless it is padding, excluded by ``window_mask`` or fully masked; rows that do
not count get ``shift_i = +inf`` so they contribute exactly 0. Everything is computed in base 2
(``exp2``, logits pre-multiplied by ``log2 e``).

- Pass 1 (``_window_shift_kernel``), one program per (window row tile, batch · q_head): an
  online max/sum over the key blocks of the tile's causal rows gives ``LSE_i`` and stores
  ``shift_i`` in a (batch, q_heads, W) fp32 buffer.
  Given the rows' log-sum-exp (FlexAttention returns it at prefill), pass 1 is skipped and
  the shifts are computed from it elementwise.
- Pass 2 (``_column_sums_kernel``), one program per (key block, batch · kv_head): holds its
  K block, loops over the window query tiles of every query head of the GQA group, recomputes
  the logits and accumulates ``exp(s - shift)`` into an image-query and a text-query fp32
  accumulator, then writes self/cross by key modality. Each output element has one owner, so
  there are no atomics and the result is deterministic.

Work: 2 · H_q · W · L · d multiply-adds for each pass (exp: H_q · W · L each).
Memory traffic (bytes ``e`` per element of q/k): pass 1 reads K once per (row tile, q head),
``B·H_q·⌈W/BLOCK_M⌉·L·d·e`` (mostly from L2), and Q once; pass 2 reads K once,
``B·H_kv·L·d·e``, and the group's window queries and shifts once per key block,
``B·H_q·⌈L/BLOCK_N⌉·W·(d·e + 4)`` (L2-resident: W·d is small). Writes: ``4·B·H_q·W`` for the
shifts and ``8·B·H_kv·L`` for the output. Extra memory: O(H·(W + L)), against the
O(H·L²) of dense logits.

fp16/bf16/fp32 inputs; logits, sums and the output are fp32 (fp16/bf16 dots run on tensor
cores with fp32 accumulation; fp32 dots use IEEE precision, not TF32). Strides are passed
explicitly, so q/k may be non-contiguous views; offsets are int64.
"""

from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path

import torch
import triton
import triton.language as tl
from torch import Tensor

_LOG2E = 1.4426950408889634
_MAX_HEAD_DIM = 256
_MAX_GRID_Y = 65535
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_SMEM_FALLBACK = 96 * 1024


def _configs(*specs: tuple[int, int, int, int]) -> list[triton.Config]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) tuples as autotune configs."""
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)
        for bm, bn, warps, stages in specs
    ]


# Pass 1 is a flash-attention forward without the PV product: wide key blocks, row tiles sized
# to W. Pass 2 holds one key block and streams row tiles: more, narrower programs help at
# small L·H_kv. A handful each keeps the first (autotuning) call to a few seconds.
_PASS1_CONFIGS = _configs(
    (16, 128, 4, 4), (32, 64, 4, 4), (32, 128, 4, 3), (64, 64, 4, 3),
    (64, 128, 4, 3), (64, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 4),
    (32, 32, 4, 2),  # fits fp32 head dims up to 256 on sm_80 (64 KiB)
    (16, 32, 8, 2), (16, 16, 4, 2),  # fp32 up to head dim 256 without spills (sm_80, sm_90)
)  # fmt: skip
_PASS2_CONFIGS = _configs(
    (64, 32, 4, 3), (32, 64, 4, 4), (64, 64, 4, 3), (128, 64, 8, 3),
    (16, 128, 4, 4), (32, 128, 4, 3), (64, 128, 8, 3),
    (16, 32, 4, 2), (32, 32, 8, 2),  # fp32 up to head dim 256 without spills (sm_80, sm_90)
)  # fmt: skip


def _prune(configs, named_args, **kwargs):
    """The configs a launch may autotune over: on an architecture in the compiled resource table
    (``aot_resources.json``: sm_80, sm_90) those that compiled within shared memory and
    without register spills; elsewhere those whose tiles fit shared memory. Then
    those whose blocks do not exceed the problem (unless none does). Never empty."""
    window, seq = named_args["window"], named_args["seq"]
    q = named_args["q_ptr"]
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
    kernel = "window_shift" if "wmask_ptr" in named_args else "column_sums"
    passing = _gate_passing(kernel, _arch(q.device), q.dtype, block_d)
    if passing is not None:
        fitting = [cfg for cfg in configs if _key(cfg) in passing]
    else:
        budget = _smem_budget(q.device)
        fitting = [
            cfg for cfg in configs if _smem(cfg, kernel, block_d, q.element_size()) <= budget
        ]
    max_m = max(16, triton.next_power_of_2(window))
    max_n = max(16, triton.next_power_of_2(seq))
    sized = [c for c in fitting if c.kwargs["BLOCK_M"] <= max_m and c.kwargs["BLOCK_N"] <= max_n]
    if sized or fitting:
        return sized or fitting
    return [min(configs, key=lambda cfg: _smem(cfg, kernel, block_d, q.element_size()))]


def _smem(cfg: triton.Config, kernel: str, block_d: int, element_size: int) -> int:
    """Shared memory of a config's tiles: pass 1 holds a q tile and pipelines k tiles, pass 2
    the reverse; the held tile plus ``num_stages - 1`` streamed ones, as Triton's pipeliner
    allocates them (checked against compiled kernels: tests/test_aot.py)."""
    held, streamed = ("BLOCK_M", "BLOCK_N") if kernel == "window_shift" else ("BLOCK_N", "BLOCK_M")
    rows = cfg.kwargs[held] + cfg.kwargs[streamed] * (cfg.num_stages - 1)
    return rows * block_d * element_size


def _key(cfg: triton.Config) -> tuple[int, int, int, int]:
    return cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_warps, cfg.num_stages


def _arch(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


# the scoring kernels' dtypes by the names of the compile gate's table (aot.py)
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _gate_passing(kernel: str, arch: int | None, dtype: torch.dtype, block_d: int):
    """The configs (:func:`_key`) of ``kernel`` that pass the compile gate for this
    architecture, dtype and head-dim block; None when the table does not cover them."""
    return _gate_table().get((kernel, arch, DTYPE_NAMES.get(dtype), block_d))


@functools.cache
def _gate_table() -> dict:
    rows = json.loads(Path(__file__).with_name("aot_resources.json").read_text())["rows"]
    table = {}
    for r in rows:
        group = table.setdefault((r["kernel"], r["arch"], r["dtype"], r["width"]), set())
        if not r["problems"]:
            group.add((r["block_m"], r["block_n"], r["num_warps"], r["num_stages"]))
    return table


def _smem_budget(device: torch.device) -> int:
    """Shared memory one program may use (A100 163 KiB, H100 227 KiB, consumer Ampere 99 KiB)."""
    if device.type != "cuda":
        return _SMEM_FALLBACK
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", _SMEM_FALLBACK)


# Tuned per size bucket and per compile-time variant: a config tuned without padding or the
# n-softmax must not be reused for a launch with them (another kernel, other register needs).
_TUNE_KEY = ["seq_bucket", "window_bucket", "group", "BLOCK_D", "HAS_PAD"]
_PRUNE = {"early_config_prune": _prune}


@triton.jit
def _window_shift_kernel(
    q_ptr, k_ptr, pad_ptr, wmask_ptr, shift_ptr,
    seq, window, q_heads, group, head_dim, qk_scale, log2_n, seq_bucket, window_bucket,
    stride_qb, stride_qh, stride_qw, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_pb, stride_pl, stride_mb, stride_mw,
    HAS_PAD: tl.constexpr, HAS_WMASK: tl.constexpr, HAS_N: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // q_heads
    h = bh % q_heads
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < window
    pos = seq - window + rows
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim

    q_base = q_ptr + b * stride_qb + h * stride_qh
    q = tl.load(
        q_base + rows.to(tl.int64)[:, None] * stride_qw + dims[None, :] * stride_qd,
        mask=row_ok[:, None] & dim_ok[None, :],
        other=0.0,
    )
    if DOT_FP32:
        q = q.to(tl.float32)
    k_base = k_ptr + b * stride_kb + (h // group) * stride_kh
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    acc = tl.zeros([BLOCK_M], tl.float32)
    # keys this tile's rows can see: [0, position of the tile's last row]
    end = seq - window + tl.minimum(pid_m * BLOCK_M + BLOCK_M, window)
    for start in range(0, end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < seq
        kt = tl.load(
            k_base + cols.to(tl.int64)[None, :] * stride_kl + dims[:, None] * stride_kd,
            mask=col_ok[None, :] & dim_ok[:, None],
            other=0.0,
        )
        if DOT_FP32:
            kt = kt.to(tl.float32)
        s = tl.dot(q, kt, input_precision="ieee") * qk_scale
        visible = cols[None, :] <= pos[:, None]
        if HAS_PAD:
            key_pad = tl.load(pad_ptr + b * stride_pb + cols * stride_pl, mask=col_ok, other=1)
            visible = visible & (key_pad == 0)[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        # a row with nothing visible yet keeps m = -inf; shift by 0 so no inf - inf appears
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        acc = acc * tl.exp2(m - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), axis=1)
        m = m_new

    counts = row_ok & (acc > 0.0)
    # base 2; a fully masked row gets a finite dummy (its shift becomes +inf below)
    lse = tl.where(counts, m + tl.log2(tl.where(counts, acc, 1.0)), 0.0)
    if HAS_PAD:
        row_pad = tl.load(pad_ptr + b * stride_pb + pos * stride_pl, mask=row_ok, other=1)
        counts = counts & (row_pad == 0)
    if HAS_WMASK:
        keep = tl.load(wmask_ptr + b * stride_mb + rows * stride_mw, mask=row_ok, other=0)
        counts = counts & (keep != 0)
    shift = lse
    if HAS_N:
        # -log2 w = log2(1 + n / 2^lse) = softplus2(log2 n - lse), evaluated without overflow
        x = log2_n - lse
        shift = lse + tl.maximum(x, 0.0) + tl.log2(1.0 + tl.exp2(-tl.abs(x)))
    shift = tl.where(counts, shift, float("inf"))
    tl.store(shift_ptr + bh * window + rows, shift, mask=row_ok)


@triton.jit
def _column_sums_kernel(
    q_ptr, k_ptr, img_ptr, pad_ptr, shift_ptr, out_ptr,
    seq, window, kv_heads, group, head_dim, qk_scale, seq_bucket, window_bucket,
    stride_qb, stride_qh, stride_qw, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_ib, stride_il, stride_pb, stride_pl,
    HAS_PAD: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // kv_heads
    kvh = bh % kv_heads
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < seq
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim

    kt = tl.load(
        k_ptr
        + b * stride_kb
        + kvh * stride_kh
        + cols.to(tl.int64)[None, :] * stride_kl
        + dims[:, None] * stride_kd,
        mask=col_ok[None, :] & dim_ok[:, None],
        other=0.0,
    )
    if DOT_FP32:
        kt = kt.to(tl.float32)
    key_ok = col_ok
    if HAS_PAD:
        key_pad = tl.load(pad_ptr + b * stride_pb + cols * stride_pl, mask=col_ok, other=1)
        key_ok = key_ok & (key_pad == 0)

    acc_img = tl.zeros([BLOCK_N], tl.float32)
    acc_txt = tl.zeros([BLOCK_N], tl.float32)
    # window rows before this one cannot see any key of the block (causality)
    first = tl.maximum(pid_n * BLOCK_N - (seq - window), 0) // BLOCK_M * BLOCK_M
    for g in range(0, group):
        h = kvh * group + g
        q_base = q_ptr + b * stride_qb + h * stride_qh
        shift_base = shift_ptr + (b * kv_heads * group + h) * window
        for start in range(first, window, BLOCK_M):
            rows = start + tl.arange(0, BLOCK_M)
            row_ok = rows < window
            pos = seq - window + rows
            q = tl.load(
                q_base + rows.to(tl.int64)[:, None] * stride_qw + dims[None, :] * stride_qd,
                mask=row_ok[:, None] & dim_ok[None, :],
                other=0.0,
            )
            if DOT_FP32:
                q = q.to(tl.float32)
            shift = tl.load(shift_base + rows, mask=row_ok, other=float("inf"))
            row_img = tl.load(img_ptr + b * stride_ib + pos * stride_il, mask=row_ok, other=0)
            s = tl.dot(q, kt, input_precision="ieee") * qk_scale
            visible = (cols[None, :] <= pos[:, None]) & key_ok[None, :]
            p = tl.exp2(tl.where(visible, s, float("-inf")) - shift[:, None])
            p_img = tl.where((row_img != 0)[:, None], p, 0.0)
            acc_img += tl.sum(p_img, axis=0)
            acc_txt += tl.sum(p - p_img, axis=0)

    key_img = tl.load(img_ptr + b * stride_ib + cols * stride_il, mask=col_ok, other=0) != 0
    out_base = out_ptr + bh * 2 * seq
    tl.store(out_base + cols, tl.where(key_img, acc_img, acc_txt), mask=col_ok)
    tl.store(out_base + seq + cols, tl.where(key_img, acc_txt, acc_img), mask=col_ok)


_window_shift_tuned = triton.autotune(
    _PASS1_CONFIGS, key=[*_TUNE_KEY, "HAS_WMASK", "HAS_N"], prune_configs_by=_PRUNE
)(_window_shift_kernel)
_column_sums_tuned = triton.autotune(
    _PASS2_CONFIGS, key=[*_TUNE_KEY, "DOT_FP32"], prune_configs_by=_PRUNE
)(_column_sums_kernel)


def _as_bytes(mask: Tensor | None, fallback: Tensor) -> tuple[Tensor, int, int]:
    """A bool mask viewed as uint8 (no copy) and its strides; ``fallback`` when None."""
    t = (fallback if mask is None else mask).view(torch.uint8)
    return t, t.stride(0), t.stride(1)


def decomposed_scores_triton(
    q_window: Tensor,
    k: Tensor,
    is_image: Tensor,
    n: float,
    scale: float,
    key_padding: Tensor | None,
    window_mask: Tensor | None,
    lse: Tensor | None = None,
    columns: int | None = None,
) -> Tensor:
    """CSP's self/cross window scores, (batch, kv_heads, 2, seq) fp32 (``[:, :, 0]`` self).

    Same semantics as ``csp_inductor.scoring.decomposed_scores_torch``, ``lse`` and
    ``columns`` included: given the window rows' log-sum-exp (natural log, (batch, q_heads, W),
    as FlexAttention returns it), pass 1 is replaced by an elementwise shift from it, and only
    the key blocks before ``columns`` are scored.

    Args:
        q_window: (batch, q_heads, W, head_dim) fp16/bf16/fp32, the last ``W`` queries.
        k: (batch, kv_heads, seq, head_dim), same dtype; ``q_heads % kv_heads == 0``.
        is_image: (batch, seq) bool, True for visual tokens.
        n: n-softmax parameter, ``>= 0`` (0 = ordinary softmax).
        scale: logit scale.
        key_padding: (batch, seq) bool, True = padding; None = no padding.
        window_mask: (batch, W) bool, the window rows that count; None = all.

    On CPU tensors (Triton's interpreter) one small fixed tile config is used; on GPU the
    tiles are autotuned per (seq bucket, W bucket, group, head_dim).
    """
    if q_window.dim() != 4 or k.dim() != 4:
        raise ValueError(
            "q_window must be (batch, q_heads, W, head_dim) and k (batch, kv_heads, seq, "
            f"head_dim), got {tuple(q_window.shape)} and {tuple(k.shape)}"
        )
    b, hq, w, d = q_window.shape
    hkv, seq = k.shape[1], k.shape[2]
    if d > _MAX_HEAD_DIM or d < 1:
        raise ValueError(
            f"head_dim={d} is not supported: allowed head_dim is 1..{_MAX_HEAD_DIM} (e.g. 16, "
            "32, 64, 80, 96, 128, 256; padded to the next power of two)"
        )
    if q_window.dtype not in _DTYPES or k.dtype != q_window.dtype:
        raise ValueError(
            f"q_window and k must share a dtype in {_DTYPES}, got {q_window.dtype} and {k.dtype}"
        )
    if hkv == 0 or hq % hkv or k.shape[0] != b or k.shape[3] != d or w > seq:
        raise ValueError(
            f"incompatible shapes q_window={tuple(q_window.shape)}, k={tuple(k.shape)}: need "
            "equal batch and head_dim, q_heads a multiple of kv_heads and W <= seq"
        )
    if not math.isfinite(n) or n < 0:
        raise ValueError(f"n must be a finite number >= 0, got n={n!r}")
    if b * hq > _MAX_GRID_Y:
        raise ValueError(
            f"batch * q_heads = {b} * {hq} = {b * hq} exceeds the launch limit {_MAX_GRID_Y}; "
            "split the batch"
        )
    for name, mask, shape in (
        ("is_image", is_image, (b, seq)),
        ("key_padding", key_padding, (b, seq)),
        ("window_mask", window_mask, (b, w)),
    ):
        if mask is not None and (
            tuple(mask.shape) != shape or mask.dtype != torch.bool or mask.device != k.device
        ):
            raise ValueError(
                f"{name} must be a bool tensor of shape {shape} on {k.device}, got "
                f"shape={tuple(mask.shape)} dtype={mask.dtype} device={mask.device}"
            )
    if q_window.device != k.device:
        raise ValueError(f"q_window is on {q_window.device} but k on {k.device}")
    if not k.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"Triton kernels need CUDA tensors (got {k.device.type}), or TRITON_INTERPRET=1 "
            "set before Triton is imported"
        )
    if lse is not None and (tuple(lse.shape) != (b, hq, w) or lse.device != k.device):
        raise ValueError(
            f"lse must be (batch, q_heads, W) = {(b, hq, w)} on {k.device}, got "
            f"shape={tuple(lse.shape)} device={lse.device}"
        )
    scored = seq if lse is None or columns is None else max(0, min(seq, columns))
    if b * hkv * scored == 0 or w == 0:
        return torch.zeros(b, hkv, 2, seq, dtype=torch.float32, device=k.device)
    out = torch.empty(b, hkv, 2, seq, dtype=torch.float32, device=k.device)
    img, stride_ib, stride_il = _as_bytes(is_image, is_image)
    pad, stride_pb, stride_pl = _as_bytes(key_padding, img)
    wmask, stride_mb, stride_mw = _as_bytes(window_mask, img)
    group = hq // hkv
    qk_scale = scale * _LOG2E
    buckets = (triton.next_power_of_2(seq), triton.next_power_of_2(w))
    consts = {
        "HAS_PAD": key_padding is not None,
        "DOT_FP32": False,
        "BLOCK_D": max(16, triton.next_power_of_2(d)),
    }
    if q_window.is_cuda:
        kernel1, kernel2 = _window_shift_tuned, _column_sums_tuned
    else:
        # Triton's interpreter runs every autotune config (use one, with few programs) and
        # multiplies bf16 tiles as raw integers (dot in fp32 instead: bf16 products are exact)
        kernel1, kernel2 = _window_shift_kernel, _column_sums_kernel
        consts.update(
            BLOCK_M=min(64, max(16, triton.next_power_of_2(w))),
            BLOCK_N=64,
            DOT_FP32=True,
        )

    def grid1(meta):
        return (triton.cdiv(w, meta["BLOCK_M"]), b * hq)

    def grid2(meta):
        return (triton.cdiv(scored, meta["BLOCK_N"]), b * hkv)

    if lse is None:
        shift = torch.empty(b, hq, w, dtype=torch.float32, device=k.device)
        kernel1[grid1](
            q_window, k, pad, wmask, shift,
            seq, w, hq, group, d, qk_scale, math.log2(n) if n > 0 else 0.0, *buckets,
            *q_window.stride(), *k.stride(), stride_pb, stride_pl, stride_mb, stride_mw,
            HAS_WMASK=window_mask is not None, HAS_N=n > 0, **consts,
        )  # fmt: skip
    else:
        shift = _shift_from_lse(lse, n, key_padding, window_mask, w)
    kernel2[grid2](
        q_window, k, img, pad, shift, out,
        seq, w, hkv, group, d, qk_scale, *buckets,
        *q_window.stride(), *k.stride(), stride_ib, stride_il, stride_pb, stride_pl,
        **consts,
    )  # fmt: skip
    if scored < seq:
        out[..., scored:] = 0.0  # unscored keys (and the tail of the last block) are 0
    return out


def _shift_from_lse(
    lse: Tensor, n: float, key_padding: Tensor | None, window_mask: Tensor | None, w: int
) -> Tensor:
    """Pass 1's output from a given log-sum-exp: ``shift = LSE - ln w`` in base 2, +inf for
    the rows that do not count (padding, outside ``window_mask``, nothing visible)."""
    lse2 = lse.float() * _LOG2E
    counts = torch.isfinite(lse2)
    if key_padding is not None:
        counts = counts & ~key_padding[:, None, -w:]
    if window_mask is not None:
        counts = counts & window_mask[:, None, :]
    shift = lse2
    if n > 0:
        # -log2 w = log2(1 + n / 2^lse) = softplus2(log2 n - lse), evaluated without overflow
        x = math.log2(n) - lse2
        shift = lse2 + x.clamp_min(0.0) + torch.log2(1.0 + torch.exp2(-x.abs()))
    return torch.where(counts, shift, math.inf).contiguous()
