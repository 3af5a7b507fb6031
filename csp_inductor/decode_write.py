"""A decode step's new tokens into the cache: the body of the ``csp_inductor::write_decode_``
op (:mod:`csp_inductor.ops`, which says why it is an op)."""

from __future__ import annotations

import torch
from torch import Tensor


def write_decode(
    keys_out: Tensor,
    values_out: Tensor,
    positions_out: Tensor,
    key_states: Tensor,
    value_states: Tensor,
    lengths: Tensor,
    seen: Tensor,
) -> None:
    """A decode step's ``t`` new tokens into one layer's buffers, in place: K/V (b, h, t, d)
    at slots ``lengths[b] + [0, t)`` of keys_out/values_out (b, h, capacity, d), their
    absolute positions ``seen + [0, t)`` into positions_out (b, h, capacity)."""
    b, h, t, _ = key_states.shape
    steps = torch.arange(t, device=key_states.device)
    slots = (lengths[:, None] + steps).view(b, 1, t).expand(b, h, t)
    for buffer, new in ((keys_out, key_states), (values_out, value_states)):
        buffer.scatter_(2, slots[..., None].expand(new.shape), new)
    positions_out.scatter_(2, slots, (seen + steps).expand(b, h, t))
