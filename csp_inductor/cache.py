"""The pruned KV cache: each layer's kept prompt tokens, compacted, in static buffers.

Per attention layer the cache holds ``keys``/``values`` of shape (batch, kv_heads, capacity,
head_dim or value_dim) and ``positions`` (batch, kv_heads, capacity) with the absolute
(padded-prompt) position of every stored token, where ``capacity = max kept prompt tokens +
decode capacity``. The first ``lengths[b]`` slots of row ``b`` are valid; the rest are never
attended to. All layers share ``seen`` (the logical number of tokens processed, i.e. the
unpruned length, so new tokens get absolute positions) and, when every layer keeps the same
count, ``lengths``; a policy that shares its budget among the layers (``layers="pyramid"``)
gives each layer its own ``lengths`` and its own capacity, so each holds just its kept tokens
and the decode room (``layer.lengths`` is ``cache.lengths`` otherwise; ``cache.lengths`` then
holds each row's longest layer).
With a bound (``max_cache_tokens``) the capacity is fixed, and each layer also holds the
modality of every stored token (``images``) and the queries of the last ``window`` tokens
(``queries``, a ring indexed by absolute position modulo ``window``; their positions and
modality in ``ring_positions``/``ring_images``): what a re-prune scores the held tokens with.
A multi-head latent attention (MLA) layer stores what transformers caches for it, the latent
(one "head" of ``kv_lora_rank``) as ``keys`` and the shared rotary key (``qk_rope_head_dim``) as
``values``; its attention expands them per head.
Linear-attention and short-conv layers hold transformers' own ``LinearAttentionLayer`` (their
states, unpruned); layers that reuse another layer's K/V, or have no attention, a
``DummyLayer``.

Phases. ``phase == "prefill"`` while the prompt goes through the decoder: :meth:`update`
returns the prompt's own K/V (the prefill attention is not pruned), and the attention backend
writes the kept tokens into the buffers with the ``csp_inductor::compact_`` op. Afterwards
``phase == "decode"``: :meth:`update` writes the new tokens at ``lengths`` in place and returns
the buffers. ``phase == "turn"`` while a later turn of a conversation goes through the decoder:
its tokens are written like decode tokens (its attention sees the kept prefix and the turn,
causally), and the backend then compacts the turn's kept tokens in place after the prefix.
A question-agnostic policy keeps the whole prompt at prefill; ``phase == "reread"`` while
chunks of the prompt are re-read to score it: written like decode tokens, never kept
(``lengths``/``seen`` stay), and the prompt is then pruned in place (:meth:`finish_prompt`).
``lengths``/``seen`` advance in :meth:`advance`, outside the compiled graph, once per forward;
being tensors updated in place, they never cause a recompilation.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.cache_utils import Cache

from .attention import NULL_POSITION
from .cache_layer import LayerSpec, PrunedLayer, new_layer
from .compaction import clear_images_from
from .ops import write_decode_op


def row_means(layer_kept: list[list[int]]) -> list[int]:
    """Each row's tokens per layer, the rounded mean of ``layer_kept[j][b]`` over the layers
    ``j`` (what a cache whose layers keep their own counts reports)."""
    return [round(sum(rows) / len(rows)) for rows in zip(*layer_kept, strict=True)]


class PrunedCache(Cache):
    """A transformers ``Cache`` holding pruned, compacted K/V (see the module docstring).

    Built by the backend (``csp_inductor.compile``): ``model.generate`` gets one automatically;
    for a plain forward pass create it with ``backend.new_cache(...)``.
    """

    is_compileable = True

    def __init__(
        self,
        specs: list[LayerSpec],
        decode_capacity: int,
        align: int = 1,
        null_slot: bool = False,
        bound: int | None = None,
        window: int = 0,
    ):
        super().__init__(layers=[])
        self.specs = specs
        self.bound = bound  # max_cache_tokens: the fixed capacity, re-pruned when full
        self.window = window  # recent queries kept for a re-prune (0: none)
        self.align = align  # capacity rounded up to a multiple of this
        self.null_slot = null_slot  # the last slot stays K = V = 0 (decode-time n-softmax)
        self.decode_capacity = int(decode_capacity)
        self.forget()

    def forget(self) -> None:
        """Hold nothing, as a new cache (a streamed prompt whose chunk raised)."""
        self.ring_positions: Tensor | None = None  # (batch, window) their positions, -1 none
        self.ring_images: Tensor | None = None  # (batch, window) their modality
        self.reprunes = 0
        self.layers = [new_layer(self, i, spec) for i, spec in enumerate(self.specs)]
        self.pruned = [layer for layer in self.layers if isinstance(layer, PrunedLayer)]
        self.phase = "empty"
        self.lengths: Tensor | None = None  # (batch,) valid slots per row (the longest layer's)
        self.layer_rows: list[list[int]] | None = None  # host lengths by layer, when they differ
        self.starts: Tensor | None = None  # (batch,) left padding per row (chunked attention)
        self.seen = torch.zeros((), dtype=torch.long)  # logical (unpruned) tokens processed
        self.rows: list[int] = []  # host mirror of lengths: no device sync per step
        self.padding: list[int] = []  # padding tokens each row has had (none of them stored)
        self.turn: Tensor | None = None  # (batch,) the running turn's kept tokens per row
        self.pending: tuple | None = None  # its (real tokens, kept, padding) per row
        # (real tokens, kept) per row, of the prompt and of each later turn
        self.turns: list[tuple[list[int], list[int]]] = []

    # --- lifecycle, driven by the backend outside the compiled graph -----------------------
    def start_prefill(
        self,
        kept: list[int],
        dtype: torch.dtype,
        device: torch.device,
        starts: Tensor | None = None,
        padding: list[int] | None = None,
        tokens: int | None = None,
        reread: int = 0,
        modality: bool = False,
        layer_kept: list[list[int]] | None = None,
    ) -> None:
        """Allocate every layer for ``kept[b]`` prompt tokens of row ``b`` plus decode room
        (``layer_kept[j][b]`` in the ``j``-th pruned layer instead, when the layers keep
        different counts: then ``kept`` is each row's mean over the layers, what it reports);
        ``starts`` (batch,) the rows' left padding (None: none), ``padding`` the rows'
        padding tokens (None: none), ``tokens`` the prompt's length (None: as kept).
        ``reread`` > 0: the prompt is kept whole, then re-read ``reread`` tokens at a time
        and pruned (:meth:`finish_prompt`); the slots' modality is stored for it (and with
        ``modality``: a streamed prompt whose later chunks are re-read)."""
        if self.phase != "empty":
            raise RuntimeError(
                "this PrunedCache already holds a prompt; create a new cache per prompt"
            )
        if self.bound is not None and max(kept) >= self.bound:
            raise ValueError(
                f"max_cache_tokens={self.bound} leaves no room for new tokens after this prompt, "
                f"whose kept tokens per row are {kept}; it must exceed them"
            )
        room = self.decode_capacity if self.bound is None else self.bound - max(kept)
        if layer_kept is not None and (self.bound is not None or reread or modality):
            raise ValueError(
                "layers that keep different counts are supported on an unbounded cache of a "
                "prompt scored at prefill (no max_cache_tokens, re-read or streaming)"
            )
        counts = [kept] * len(self.pruned) if layer_kept is None else layer_kept
        images = modality or self.bound is not None or reread > 0
        for layer, rows in zip(self.pruned, counts, strict=True):
            capacity = self._capacity(max(rows) + max(room, reread))
            layer.allocate(len(kept), capacity, dtype, device, images, self.window)
        if self.window:
            self.ring_positions = torch.full((len(kept), self.window), -1, device=device)
            self.ring_images = torch.zeros(len(kept), self.window, dtype=torch.bool, device=device)
        self._mark_null_slot()
        self.lengths = torch.tensor(kept, dtype=torch.long, device=device)
        self.rows = list(kept)
        for layer in self.pruned:
            layer.lengths = self.lengths
        if layer_kept is not None:
            self._by_layer(layer_kept)
        self.starts = torch.zeros_like(self.lengths) if starts is None else starts.to(device)
        self.seen = self.seen.to(device)
        self.padding = [0] * len(kept) if padding is None else list(padding)
        real = kept if tokens is None else [tokens - pad for pad in self.padding]
        self.turns = [(list(real), list(kept))]
        self.phase = "prefill"

    def _by_layer(self, layer_kept: list[list[int]]) -> None:
        """From now on the ``j``-th pruned layer holds ``layer_kept[j][b]`` tokens of row
        ``b``, in lengths of its own; ``lengths``/``rows`` hold each row's longest layer."""
        self.layer_rows = [list(rows) for rows in layer_kept]
        for layer, rows in zip(self.pruned, layer_kept, strict=True):
            layer.lengths = torch.tensor(rows, dtype=torch.long, device=self.lengths.device)
        self.rows = [max(rows) for rows in zip(*layer_kept, strict=True)]
        self.lengths.copy_(torch.tensor(self.rows, dtype=torch.long))

    def _capacity(self, slots: int) -> int:
        """Buffer length for ``slots`` tokens: the null slot added, whole flex blocks."""
        return -(-(slots + int(self.null_slot)) // self.align) * self.align

    def finish_prompt(
        self, kept: list[int] | None = None, layer_kept: list[list[int]] | None = None
    ) -> None:
        """After a prompt held whole (re-read) or over-kept (``layers="adaptive"``) was pruned
        in place to ``kept[b]`` tokens per row, or to ``layer_kept[j][b]`` in the ``j``-th
        pruned layer (the layers keeping their own counts; their :func:`row_means` reported):
        record them and give the buffers back, down to the kept tokens and the decode room."""
        if layer_kept is not None:
            kept = row_means(layer_kept)
        self.turns[0] = (self.turns[0][0], list(kept))
        self.pruned_to(kept, layer_kept)
        self.fit(self.decode_capacity)

    def pruned_to(self, kept: list[int], layer_kept: list[list[int]] | None = None) -> None:
        """After the held tokens were pruned in place to ``kept[b]`` per row (or each layer's
        to its own ``layer_kept[j][b]``, from then on: see :meth:`finish_prompt`): record them,
        and clear the slots after them."""
        if layer_kept is None:
            self.lengths.copy_(torch.tensor(kept, dtype=torch.long))
            self.rows = list(kept)
        else:
            self._by_layer(layer_kept)
        for layer in self.pruned:
            slots = torch.arange(layer.keys.shape[2], device=self.lengths.device)
            free = slots >= layer.lengths[:, None, None]
            layer.positions.masked_fill_(free, -1)
            for buffer in (layer.keys, layer.values):  # the null slot among them: K = V = 0
                buffer.masked_fill_(free[..., None], 0)
            if layer.images is not None:
                layer.images.masked_fill_(free, False)
        self._mark_null_slot()
        self.phase = "decode"

    def fit(self, room: int) -> None:
        """Give each layer's buffers back down to its longest row and ``room`` more slots
        (no-op for a layer no longer than that)."""
        counts = self.layer_rows or [self.rows] * len(self.pruned)
        for layer, rows in zip(self.pruned, counts, strict=True):
            capacity = self._capacity(max(rows) + room)
            if capacity >= layer.keys.shape[2]:
                continue
            for name in ("keys", "values", "positions", "images"):
                if getattr(layer, name) is not None:
                    setattr(layer, name, getattr(layer, name)[:, :, :capacity].clone())
            layer.mark_static()
        self._mark_null_slot()

    def start_turn(self, tokens: int, kept: list[int], padding: list[int], room: int = 0) -> None:
        """Before a turn of ``tokens`` new tokens (``padding[b]`` of them padding in row ``b``)
        of which row ``b`` keeps ``kept[b]``: make room for the whole turn and ``room`` more
        (a bounded cache has been given room by its backend: it never grows)."""
        if self.phase != "decode":
            raise RuntimeError(f"a turn continues a cache after a prompt; this one is {self.phase}")
        if self.bound is None and self.room() < tokens + room:
            self.grow(tokens + room - self.room())
        self.turn = torch.tensor(kept, dtype=torch.long, device=self.lengths.device)
        self.pending = ([tokens - p for p in padding], list(kept), list(padding))
        self.phase = "turn"

    def abandon_turn(self) -> None:
        """Forget a turn whose forward raised: lengths and ``seen`` never moved, so the cache
        holds what it held before the turn (the remembered queries of its tokens dropped)."""
        self.turn, self.pending, self.phase = None, None, "decode"
        if self.ring_positions is not None:
            self.ring_positions.masked_fill_(self.ring_positions >= self.seen, -1)
        for layer in self.pruned:
            if layer.images is not None:
                clear_images_from(layer.images, layer.lengths)

    @property
    def kept_prompt(self) -> list[int]:
        """Kept prompt tokens per row, for reports."""
        return self.turns[0][1] if self.turns else []

    @property
    def held(self) -> list[int]:
        """Tokens each row holds in a layer (rounded mean over the layers, where they keep
        their own counts), for reports."""
        if self.layer_rows is None:
            return list(self.rows)
        return row_means(self.layer_rows)

    @property
    def longest(self) -> int:
        """The longest row's stored tokens."""
        return max(self.rows)

    def advance(self, new_tokens: int) -> None:
        """After a forward of ``new_tokens`` tokens: move the lengths and the logical length."""
        if self.phase == "turn":
            real, kept, padding = self.pending
            self.lengths.add_(self.turn)
            self.rows = [n + k for n, k in zip(self.rows, kept, strict=True)]
            if self.layer_rows is not None:  # (every layer keeps the turn's count)
                lengths = [layer.lengths for layer in self.pruned]
                torch._foreach_add_(lengths, [self.turn] * len(lengths))
                self.layer_rows = [
                    [n + k for n, k in zip(rows, kept, strict=True)] for rows in self.layer_rows
                ]
            self.turns.append((real, kept))
            self.padding = [a + b for a, b in zip(self.padding, padding, strict=True)]
            self.turn = self.pending = None
        elif self.phase == "decode":
            self.lengths.add_(new_tokens)
            self.rows = [n + new_tokens for n in self.rows]
            if self.layer_rows is not None:
                torch._foreach_add_([layer.lengths for layer in self.pruned], new_tokens)
                self.layer_rows = [[n + new_tokens for n in rows] for rows in self.layer_rows]
        self.seen.add_(new_tokens)
        self.phase = "decode"

    def room(self) -> int:
        """How many more tokens fit (the tightest row): in the decode capacity, or under the
        bound (the buffers may be longer, rounded up to whole flex blocks)."""
        if self.layer_rows is not None:  # (unbounded)
            return min(
                layer.keys.shape[2] - int(self.null_slot) - max(rows)
                for layer, rows in zip(self.pruned, self.layer_rows, strict=True)
            )
        slots = self.pruned[0].keys.shape[2] - int(self.null_slot)
        return (slots if self.bound is None else min(slots, self.bound)) - self.longest

    def grow(self, extra: int) -> None:
        """Enlarge the decode capacity by ``extra`` slots (copies the buffers; rare)."""
        if self.bound is not None:
            raise RuntimeError(f"a cache bounded to {self.bound} tokens does not grow")
        extra = -(-extra // self.align) * self.align
        for layer in self.pruned:
            pad = (0, 0, 0, extra)
            layer.keys = torch.nn.functional.pad(layer.keys, pad)
            layer.values = torch.nn.functional.pad(layer.values, pad)
            layer.positions = torch.nn.functional.pad(layer.positions, (0, extra), value=-1)
            if layer.images is not None:  # a re-read prompt's modality
                layer.images = torch.nn.functional.pad(layer.images, (0, extra), value=False)
            if self.null_slot:  # the old null slot becomes an ordinary free slot
                layer.positions[..., -extra - 1] = -1
            layer.mark_static()
        self._mark_null_slot()

    def _mark_null_slot(self) -> None:
        if self.null_slot:
            for layer in self.pruned:
                layer.positions[..., -1] = NULL_POSITION

    # --- inside the compiled graph -----------------------------------------------------------
    def write_decode(self, layer: PrunedLayer, key_states: Tensor, value_states: Tensor):
        """Write ``t`` new tokens at slots ``lengths[b] + [0, t)`` (the layer's); return the
        whole buffers."""
        write_decode_op(
            layer.keys, layer.values, layer.positions, key_states, value_states, layer.lengths,
            self.seen,
        )  # fmt: skip
        return layer.keys, layer.values

    # --- reports -------------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes held by the K/V buffers of all layers (positions not included); 0 before the
        first prompt."""
        return sum(
            layer.keys.nbytes + layer.values.nbytes for layer in self.pruned if layer.is_initialized
        )

    def kv_bytes_per_token(self) -> int:
        """K+V bytes of one token summed over layers and KV heads; 0 before the first prompt."""
        return sum(
            layer.keys.shape[1]
            * (layer.keys.shape[3] + layer.values.shape[3])
            * layer.keys.element_size()
            for layer in self.pruned
            if layer.is_initialized
        )

    def get_seq_length(self, layer_idx: int = 0) -> Tensor:
        return self.seen

    def get_mask_sizes(self, queries, layer_idx: int) -> tuple[int, int]:
        return self.pruned[0].get_mask_sizes(queries)  # every pruned layer alike
