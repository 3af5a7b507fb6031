"""Fused CSP window scores: two Triton passes, no (seq, seq) matrix, no atomics.

The kernels; their launcher, autotune configs and compile gate are in ``decomposed_scores.py``.

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

import triton
import triton.language as tl


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
