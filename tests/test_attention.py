"""Prefill/decode attention: SDPA and FlexAttention paths against a dense fp64 reference."""

import math

import pytest
import torch

from csp_inductor import n_softmax
from csp_inductor.attention import (
    NULL_POSITION,
    choose_kernel,
    decode_attention,
    decode_block_mask,
    prefill_attention,
)


def dense(q, k, v, allowed, scale):
    """q (b, hq, t, d), k/v (b, hkv, s, d), allowed (b, hq, t, s) -> (b, t, hq, d)."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    logits = (q @ k.transpose(-1, -2) * scale).masked_fill(~allowed, -math.inf)
    return (torch.softmax(logits, -1) @ v).transpose(1, 2)


@pytest.fixture(scope="module")
def flex_prefill():
    return torch.compile(prefill_attention, fullgraph=True, dynamic=False)


@pytest.mark.parametrize(
    ("kernel", "pads", "window", "chunk"),
    [
        ("sdpa", None, None, None),
        ("sdpa", [0, 7], None, None),
        ("sdpa", [3, 0], 5, None),
        ("sdpa", [0, 7], None, 8),
        ("flex", None, None, None),
        ("flex", [3, 0], 5, None),
        ("flex", [0, 7], None, 8),
    ],
)
def test_prefill_matches_dense(kernel, pads, window, chunk, flex_prefill):
    torch.manual_seed(0)
    b, hq, hkv, seq, d = 2, 4, 2, 37, 16
    q, k, v = (torch.randn(b, h, seq, d) for h in (hq, hkv, hkv))
    pad = None if pads is None else torch.arange(seq)[None] < torch.tensor(pads)[:, None]
    fn = flex_prefill if kernel == "flex" else prefill_attention
    starts = None if pad is None else torch.tensor(pads)  # the rows' left padding
    kw = dict(key_padding=pad, sliding_window=window, kernel=kernel, chunk=chunk, starts=starts)
    out = fn(q, k, v, scale=0.3, **kw)
    i = torch.arange(seq)
    allowed = (i[None] <= i[:, None]).expand(b, hq, seq, seq)
    if window is not None:
        allowed = allowed & (i[:, None] - i[None] < window)
    if chunk is not None:  # chunks from each row's first real token
        rel = i[None] - torch.tensor(pads)[:, None]  # (b, seq)
        same = rel[:, :, None] // chunk == rel[:, None, :] // chunk
        allowed = allowed & same[:, None]
    if pad is not None:
        allowed = allowed & ~pad[:, None, None, :]
    want = dense(q.double(), k.double(), v.double(), allowed, 0.3)
    real = slice(None) if pad is None else ~pad  # padding query rows are don't-care
    torch.testing.assert_close(out[real].double(), want[real], atol=2e-5, rtol=1e-4)
    assert out.isfinite().all()


@pytest.mark.parametrize(("window", "chunk"), [(None, None), (60, None), (None, 64)])
def test_decode_sdpa_and_flex_match_dense(window, chunk):
    torch.manual_seed(1)
    # cap: a whole number of flex blocks, as the cache allocates for flex (see PrunedCache)
    b, hq, hkv, cap, d = 2, 4, 2, 256, 16
    q = torch.randn(b, hq, 1, d)
    keys, values = torch.randn(b, hkv, cap, d), torch.randn(b, hkv, cap, d)
    lengths = torch.tensor([11, 229])
    positions = torch.sort(torch.randint(0, 300, (b, hkv, cap)), dim=-1).values
    seen = torch.tensor(302)
    positions[torch.arange(b), :, lengths] = seen  # the new token, written before attending
    starts = torch.tensor([0, 9])  # left padding: where each row's chunks start
    kw = dict(lengths=lengths, positions=positions, seen=seen, scale=0.25, sliding_window=window)
    kw |= dict(chunk=chunk, starts=starts)
    sdpa = decode_attention(q, keys, values, kernel="sdpa", **kw)
    mask = decode_block_mask(lengths, positions, seen, window, hq, chunk=chunk, starts=starts)
    flex = torch.compile(decode_attention, fullgraph=True, dynamic=False)(
        q, keys, values, kernel="flex", block_mask=mask, **kw
    )
    slot = torch.arange(cap)
    allowed = (slot[None, None, :] < lengths[:, None, None] + 1)[:, None]  # (b, 1, 1, cap)
    allowed = allowed.expand(b, hkv, 1, cap)
    if window is not None:
        allowed = allowed & (seen - positions[:, :, None, :] < window)
    if chunk is not None:
        start = starts[:, None, None, None]
        allowed = allowed & ((seen - start) // chunk == (positions[:, :, None, :] - start) // chunk)
    allowed = allowed.repeat_interleave(hq // hkv, 1)
    want = dense(q.double(), keys.double(), values.double(), allowed, 0.25)
    torch.testing.assert_close(sdpa.double(), want, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(flex.double(), want, atol=2e-5, rtol=1e-4)
    # lengths change in place: the same block mask stays valid
    lengths += 3
    again = decode_attention(q, keys, values, kernel="sdpa", **kw)
    assert not torch.allclose(again, sdpa)


def test_kernel_choice():
    assert choose_kernel("auto", torch.device("cpu")) == "sdpa"
    assert choose_kernel("auto", torch.device("cuda")) == "flex"
    with pytest.raises(ValueError, match="kernel must be one of"):
        choose_kernel("triton", torch.device("cpu"))


@pytest.mark.parametrize("kernel", ["sdpa", "flex"])
def test_decode_null_slot_gives_the_n_softmax(kernel):
    torch.manual_seed(2)
    b, hq, hkv, cap, d, n = 2, 4, 2, 128, 16, 3.0
    q = torch.randn(b, hq, 1, d)
    keys, values = torch.randn(b, hkv, cap, d), torch.randn(b, hkv, cap, d)
    keys[:, :, -1] = 0  # the null slot, as the cache keeps it
    values[:, :, -1] = 0
    lengths = torch.tensor([17, 90])
    positions = torch.arange(cap).expand(b, hkv, cap).clone()
    positions[..., -1] = NULL_POSITION  # as the cache marks its null slot
    seen = torch.tensor(cap)
    kw = dict(lengths=lengths, positions=positions, seen=seen, scale=0.3, sliding_window=None)
    mask = decode_block_mask(lengths, positions, seen, None, q_heads=hq, null_slot=True)
    fn = torch.compile(decode_attention, fullgraph=True) if kernel == "flex" else decode_attention
    out = fn(q, keys, values, kernel=kernel, block_mask=mask, null_logit=math.log(n), **kw)
    g = hq // hkv
    logits = q.double() @ keys.double().repeat_interleave(g, 1).transpose(-1, -2) * 0.3
    valid = torch.arange(cap)[None, None, None, :] < lengths[:, None, None, None] + 1
    weights = n_softmax(logits.masked_fill(~valid, -math.inf), n=n)
    want = (weights @ values.double().repeat_interleave(g, 1)).transpose(1, 2)
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=1e-4)


def test_flex_decode_mask_lives_on_the_caches_device():
    # on CUDA flex refuses a block mask on another device than q/k/v; "meta" stands in for it
    lengths = torch.tensor([3, 5], device="meta")
    positions = torch.zeros(2, 2, 256, dtype=torch.long, device="meta")
    seen = torch.tensor(9, device="meta")
    for window in (None, 60):
        mask = decode_block_mask(lengths, positions, seen, window, q_heads=4, q_len=3)
        assert {t.device.type for t in mask.as_tuple() if isinstance(t, torch.Tensor)} == {"meta"}
        assert mask.kv_num_blocks.shape == (2, 1 if window is None else 4, 1)
