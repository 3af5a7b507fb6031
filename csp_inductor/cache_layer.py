"""One decoder layer of the pruned cache (:mod:`csp_inductor.cache`): what it stores
(:class:`LayerSpec`) and its buffers (:class:`PrunedLayer`), or transformers' own layer for
a layer it does not prune."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from transformers.cache_utils import CacheLayerMixin

from .compat import DummyLayer, LinearAttentionLayer, query_length

if TYPE_CHECKING:
    from .cache import PrunedCache


@dataclass(frozen=True)
class LayerSpec:
    """One decoder layer's cache. ``kind``: ``"attention"`` (pruned K/V of ``kv_heads`` heads of
    ``head_dim``, values of ``value_dim`` when it differs; ``sliding_window`` None = global
    attention; ``latent`` for an MLA layer, whose "K/V" are its latent and rotary key),
    ``"recurrent"`` (conv/recurrent
    states of a linear-attention or short-conv layer, ``states`` of them, kept whole as
    transformers keeps them), ``"shared"`` (the layer reads another layer's K/V) or ``"none"``
    (no attention): the last two store nothing."""

    kv_heads: int = 0
    head_dim: int = 0
    sliding_window: int | None = None
    kind: str = "attention"
    states: int = 1
    value_dim: int | None = None
    latent: bool = False
    q_heads: int = 0


class PrunedLayer(CacheLayerMixin):
    is_compileable = True
    is_sliding = False

    def __init__(self, cache: PrunedCache, index: int, spec: LayerSpec):
        super().__init__()
        self.cache, self.index, self.spec = cache, index, spec
        self.sliding_window = spec.sliding_window
        self.is_sliding = spec.sliding_window is not None  # read by transformers' mask sizing
        self.keys = self.values = self.positions = None
        self.lengths: Tensor | None = None  # (batch,) valid slots per row (see the module)
        self.images = self.queries = None  # with a bound: stored modality, recent queries
        self.prompt: tuple[Tensor, Tensor] | None = None  # an MLA layer's prompt latents

    def allocate(
        self,
        batch: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device,
        images: bool = False,
        window: int = 0,
    ):
        spec = self.spec
        shape = (batch, spec.kv_heads, capacity, spec.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        value_shape = (*shape[:3], spec.value_dim or spec.head_dim)
        self.values = torch.zeros(value_shape, dtype=dtype, device=device)
        self.positions = torch.full(shape[:3], -1, dtype=torch.long, device=device)
        if images:
            self.images = torch.zeros(shape[:3], dtype=torch.bool, device=device)
        if window:
            ring = (batch, spec.q_heads, window, spec.head_dim)
            self.queries = torch.zeros(ring, dtype=dtype, device=device)
        self.mark_static()
        self.is_initialized = True

    def buffers(self) -> list[Tensor]:
        held = (self.keys, self.values, self.positions, self.images, self.queries)
        return [t for t in held if t is not None]

    def mark_static(self) -> None:
        """Batch and capacity vary; heads and head_dim never do. Marked static, they cannot be
        duck-sized together with a batch of the same size (a spurious recompilation)."""
        for t in self.buffers():
            for dim in range(1, t.dim(), 2):
                torch._dynamo.mark_static(t, dim)

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        raise RuntimeError("a PrunedCache is allocated by its backend before the prefill")

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs):
        phase = self.cache.phase
        if phase == "turn" or (phase == "prefill" and self.spec.latent):
            # compaction needs them: a turn's attention sees the buffers, an MLA layer's its
            # expanded K/V
            self.prompt = (key_states, value_states)
        if phase == "prefill":
            return key_states, value_states
        return self.cache.write_decode(self, key_states, value_states)

    def get_seq_length(self) -> Tensor:
        return self.cache.seen

    def get_mask_sizes(self, queries) -> tuple[int, int]:
        # A prompt attends to itself (not to the buffers, which it fills). After it, the size
        # is the buffers' and the offset the tokens seen: a model's mask function then reads
        # the new tokens at their absolute positions (transformers_attention._check_causal_turn).
        if self.cache.phase in ("empty", "prefill"):
            return query_length(queries), 0
        return self.keys.shape[2], self.cache.seen

    def get_max_length(self) -> int:
        return self.keys.shape[2]

    get_max_cache_shape = get_max_length  # its name before transformers 5.3

    def reset(self) -> None:
        for t in (self.keys, self.values, self.images, self.queries):
            if t is not None:
                t.zero_()
        if self.positions is not None:
            self.positions.fill_(-1)


def new_layer(cache: PrunedCache, index: int, spec: LayerSpec):
    """The cache layer for a decoder layer of ``spec``."""
    if spec.kind == "attention":
        return PrunedLayer(cache, index, spec)
    if spec.kind == "recurrent":
        return LinearAttentionLayer(number_of_states=spec.states)
    return DummyLayer()
