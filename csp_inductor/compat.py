"""The transformers versions we support (pyproject.toml), in one place.

transformers 5.2 (the newest that NVIDIA kvpress accepts) differs from 5.3+ where the backend
plugs in: its cache layers know no ``DummyLayer``/``LinearAttentionLayer`` (recurrent layers
keep their state in model-specific caches), its mask functions receive the queries'
``cache_position`` instead of ``q_length``/``q_offset``, its Gemma 3n shares K/V by
``num_kv_shared_layers`` and its MLA models cache per-head K/V. Everything else in the package
uses the names here and does not look at versions.
"""

from __future__ import annotations

import inspect

import torch
import transformers
from packaging.version import Version
from torch import Tensor
from transformers import cache_utils
from transformers.masking_utils import sdpa_mask as _sdpa_mask

BEFORE_5_3 = Version(transformers.__version__).release < (5, 3)

# transformers < 5.3: mask functions get the queries' cache_position
POSITIONAL_MASKS = "cache_position" in inspect.signature(_sdpa_mask).parameters

# None where recurrent layers keep their state in a model-specific cache (transformers < 5.3)
LinearAttentionLayer = getattr(cache_utils, "LinearAttentionLayer", None)


class _NoCacheLayer(cache_utils.CacheLayerMixin):
    """A decoder layer that caches nothing (an MLP-only layer, or one reading another's K/V),
    as transformers >= 5.3's ``DummyLayer``: nothing to update, every cache operation a no-op."""

    is_compileable = True
    is_sliding = False

    def __init__(self):
        super().__init__()
        self.is_initialized = True

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        pass

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs):
        raise NotImplementedError("a layer that caches nothing cannot be updated")

    def get_seq_length(self, *args) -> int:
        return 0

    def get_mask_sizes(self, *args) -> tuple[int, int]:
        return 0, 0

    def get_max_cache_shape(self) -> int:
        return -1

    def _nothing(self, *args, **kwargs) -> None:
        pass

    offload = prefetch = reset = crop = reorder_cache = _nothing
    batch_repeat_interleave = batch_select_indices = _nothing


DummyLayer = getattr(cache_utils, "DummyLayer", _NoCacheLayer)


def query_length(sizes_argument) -> int:
    """The new tokens' count from a cache's ``get_mask_sizes`` argument: their count
    (transformers >= 5.3) or their ``cache_position`` (earlier)."""
    return sizes_argument.shape[0] if isinstance(sizes_argument, Tensor) else sizes_argument


def layer_types_and_kwargs(text_config) -> tuple[list[str], list[dict]]:
    """transformers' cache layer type of every decoder layer and the arguments its own cache
    would build it with (what ``DynamicCache(config=...)`` reads, before 5.3)."""
    read = getattr(cache_utils, "get_layer_types_and_kwargs", None)
    if read is not None:
        kinds, kwargs = read(text_config)
        return list(kinds), list(kwargs)
    window = getattr(text_config, "sliding_window", None) or getattr(
        text_config, "attention_chunk_size", None
    )
    chunked = getattr(text_config, "sliding_window", None) is None and window is not None
    kind = "chunked_attention" if chunked else "sliding_attention" if window else "full_attention"
    kinds = getattr(text_config, "layer_types", None) or [kind] * text_config.num_hidden_layers
    kinds = ["dummy" if kind in ("moe", "mlp") else kind for kind in kinds]
    windowed = ("sliding_attention", "chunked_attention")
    kwargs = [{"sliding_window": window} if kind in windowed else {} for kind in kinds]
    return kinds, kwargs


def kv_sharing_modes(text_config) -> list[str] | None:
    """Per layer ``"store"``, ``"reuse"`` (the last storing layer of its type's K/V) or None
    (neither), or None when no layer shares K/V. Before 5.3, Gemma 3n's last
    ``num_kv_shared_layers`` reuse."""
    modes = getattr(text_config, "kv_sharing_modes", None)
    if modes is not None:
        return list(modes)
    shared = getattr(text_config, "num_kv_shared_layers", 0) or 0
    layers = text_config.num_hidden_layers
    if 0 < shared < layers:
        return ["store"] * (layers - shared) + ["reuse"] * shared
    return None


def caches_latent(attn: torch.nn.Module) -> bool:
    """Whether an MLA attention module caches its latent (transformers >= 5.3, which expands
    it per head with ``expand_kv``); earlier ones cache per-head K/V like any attention."""
    if getattr(attn, "kv_lora_rank", None) is None:
        return False
    return not BEFORE_5_3 or hasattr(attn, "expand_kv")


def sdpa_mask(*, q_length: int, q_offset, device, **kwargs):
    """transformers' ``sdpa_mask`` for ``q_length`` queries from ``q_offset``."""
    if POSITIONAL_MASKS:
        positions = torch.arange(q_length, device=device) + q_offset
        return _sdpa_mask(cache_position=positions, **kwargs)
    return _sdpa_mask(q_length=q_length, q_offset=q_offset, device=device, **kwargs)


def mask_call(kwargs: dict, q_length, q_offset, device, allow_is_causal_skip: bool):
    """A mask function's queries, device and causal-skip permission, from its arguments in
    either convention. Before 5.3 a compileable cache never allows the causal skip; a mask
    that is not plain causal is told by an extra mask function (an overlay of the model's own:
    ``use_vmap``) or by being bidirectional (``allow_is_bidirectional_skip`` passed): the
    signal 5.3+ gives as ``allow_is_causal_skip``."""
    position = kwargs.get("cache_position")
    if position is None:
        return q_length, q_offset, device, allow_is_causal_skip
    plain = not kwargs.get("use_vmap", False) and "allow_is_bidirectional_skip" not in kwargs
    return position.shape[0], position[0], position.device, plain


# transformers 5.24 renamed the forward's cache argument (the old name still works, deprecated)
LEGACY_CACHE_ARG = "past_key_values"


def forward_cache_arg(forward) -> str:
    """The name ``forward`` takes the cache by (transformers 5.24 renamed it; the old name
    still works, deprecated)."""
    return "cache" if "cache" in inspect.signature(forward).parameters else LEGACY_CACHE_ARG


def rename_legacy_cache_arg(kwargs: dict, cache_arg: str) -> None:
    """Move a cache passed as ``past_key_values`` to ``cache_arg`` (in place)."""
    if cache_arg != LEGACY_CACHE_ARG and LEGACY_CACHE_ARG in kwargs:
        if kwargs.get(cache_arg) is not None:
            raise TypeError(f"got both {cache_arg!r} and {LEGACY_CACHE_ARG!r}; pass {cache_arg!r}")
        kwargs[cache_arg] = kwargs.pop(LEGACY_CACHE_ARG)
