"""The launcher of the fused CSP window scores: input checks, the autotune configs and the compile
gate that prunes them (``aot_resources.json``), and the launch of the two Triton passes (their
math, work and memory traffic: ``decomposed_passes.py``).
"""

from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path

import torch
import triton
from torch import Tensor

from .decomposed_passes import _column_sums_kernel, _window_shift_kernel

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
    _check_inputs(q_window, k, is_image, n, key_padding, window_mask, lse)
    b, hq, w, d = q_window.shape
    hkv, seq = k.shape[1], k.shape[2]
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
    kernel1, kernel2, consts = _kernels(q_window, key_padding is not None, w, d)

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


def _check_inputs(
    q_window: Tensor,
    k: Tensor,
    is_image: Tensor,
    n: float,
    key_padding: Tensor | None,
    window_mask: Tensor | None,
    lse: Tensor | None,
) -> None:
    """Raise ValueError, naming the numbers, for inputs :func:`decomposed_scores_triton`
    does not take."""
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


def _kernels(q_window: Tensor, has_pad: bool, w: int, d: int):
    """``(pass 1, pass 2, constexprs)``: autotuned on GPU, one fixed tile config in Triton's
    interpreter."""
    consts = {
        "HAS_PAD": has_pad,
        "DOT_FP32": False,
        "BLOCK_D": max(16, triton.next_power_of_2(d)),
    }
    if q_window.is_cuda:
        return _window_shift_tuned, _column_sums_tuned, consts
    # Triton's interpreter runs every autotune config (use one, with few programs) and
    # multiplies bf16 tiles as raw integers (dot in fp32 instead: bf16 products are exact)
    consts.update(
        BLOCK_M=min(64, max(16, triton.next_power_of_2(w))),
        BLOCK_N=64,
        DOT_FP32=True,
    )
    return _window_shift_kernel, _column_sums_kernel, consts


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
