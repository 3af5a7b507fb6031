"""What ``compile`` changes on a model, and its undo: :func:`install`.

1. registers the ``"csp_inductor"`` attention and mask functions with transformers and selects
   them for the text decoder only (the vision tower keeps its own attention);
2. adds a forward pre/post hook pair on the model (:mod:`.dispatch`), and a pre-hook on the
   decoder that captures a prompt's input embeddings for a re-read (:mod:`.reread`);
3. wraps ``generate`` (the cache's decode room follows ``max_new_tokens``; the backend's cache
   stands in for the ``cache_implementation`` asked for) and ``prepare_inputs_for_generation``
   (the 2D mask of the prompt, before generate turns it into 4D ones);
4. compiles the decoder's forward and the LM head of decode steps; with ``prefill_chunk``,
   the decoder's forward streams long prompts (:mod:`.stream`).

Everything is undone by closing the returned stack, except the registration of the functions
with transformers: process-wide, shared by every compiled model, and selected by none once its
models are restored.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from .. import compat
from ..transformers_attention import csp_attention, model_mask
from . import dispatch, reread
from .compiled_forward import CompiledForward
from .lm_head import CompiledHead
from .stream import StreamedForward
from .stream_model import StreamedModelForward, streams_inputs

if TYPE_CHECKING:
    from .core import Backend

ATTN_NAME = "csp_inductor"
# generate's cache_implementation values that the pruned (static) cache stands in for
REPLACEABLE_CACHES = ("static", "dynamic", "hybrid", "sliding_window")


@dataclass
class GenerateCall:
    """A running ``generate`` call: the new tokens it may make (the decode room a turn makes
    beside its own tokens), its forwards so far (the first on a cache holding a conversation
    is a new turn, later ones decode steps), and the 2D attention mask it prepared for its next
    forward (``prepared``; None = no padding)."""

    new_tokens: int
    forwards: int = 0
    prepared: bool = False
    mask: torch.Tensor | None = None

    def take_mask(self) -> tuple[bool, torch.Tensor | None]:
        """The prepared mask, for one forward only (whether it succeeds or raises)."""
        prepared, mask = self.prepared, self.mask
        self.prepared, self.mask = False, None
        return prepared, mask


def install(backend: Backend) -> contextlib.ExitStack:
    """Route ``backend.model`` through the backend; closing the returned stack undoes it."""
    model, decoder, undo = backend.model, backend.decoder, contextlib.ExitStack()
    AttentionInterface.register(ATTN_NAME, csp_attention)
    AttentionMaskInterface.register(ATTN_NAME, model_mask)
    previous = attn_implementations(model)
    model.set_attn_implementation(backend.layout.attn_target)
    undo.callback(model.set_attn_implementation, previous)
    for attn in backend.attention_modules("attention", "shared").values():  # ours to serve
        _set(undo, attn, "csp_backend", backend)
    pre = model.register_forward_pre_hook(
        functools.partial(dispatch.before_forward, backend), with_kwargs=True
    )
    post = model.register_forward_hook(
        functools.partial(dispatch.after_forward, backend), with_kwargs=True
    )
    embeds = decoder.register_forward_pre_hook(
        functools.partial(reread.capture_prompt, backend), with_kwargs=True
    )
    for handle in (pre, post, embeds):
        undo.callback(handle.remove)
    _set(undo, model, "generate", functools.wraps(model.generate)(_generate(backend)))
    prepare = model.prepare_inputs_for_generation
    _set(undo, model, "prepare_inputs_for_generation", _prepare_inputs(backend, prepare))
    own = forward = decoder.forward
    signature = inspect.signature(own)
    if backend.options.compile:
        forward = backend.compiled = CompiledForward(
            forward, dynamic=backend.options.dynamic, keep_mask=backend.layout.recurrent
        )
    if backend.options.prefill_chunk is not None:
        forward = StreamedForward(backend, forward, signature)
    if forward is not own:
        _set(undo, decoder, "forward", forward)
    if backend.options.prefill_chunk is not None and streams_inputs(model):
        signature = inspect.signature(model.forward)
        _set(undo, model, "forward", StreamedModelForward(backend, model.forward, signature))
    if backend.options.compile:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if type(head) is nn.Linear:  # (a subclass may compute something else)
            backend.lm_head = CompiledHead(head)
            _set(undo, head, "forward", backend.lm_head)
    _set(undo, model, "csp_backend", backend)
    return undo


def _set(undo: contextlib.ExitStack, obj, name: str, value) -> None:
    """``obj.name = value`` (an instance attribute), deleted again by ``undo``."""
    setattr(obj, name, value)
    undo.callback(delattr, obj, name)


def _generate(backend: Backend):
    generate = backend.model.generate

    def wrapped(*args, **kwargs):
        compat.rename_legacy_cache_arg(kwargs, backend.cache_arg)
        config = kwargs.get("generation_config") or backend.model.generation_config
        use_cache = kwargs.get("use_cache", config.use_cache)
        new = kwargs.get("max_new_tokens") or config.max_new_tokens or backend.decode_capacity
        if use_cache is not False and kwargs.get(backend.cache_arg) is None:
            kwargs[backend.cache_arg] = backend.new_cache(new)
        backend.generating = GenerateCall(new)
        # generate compiles the whole forward on GPUs when the cache is compileable; the
        # backend compiles the decoder itself, and its hooks run eagerly around it
        kwargs.setdefault("disable_compile", True)
        try:
            with _no_cache_implementation(backend.model, kwargs):
                return generate(*args, **kwargs)
        finally:
            backend.generating = None

    return wrapped


def _prepare_inputs(backend: Backend, prepare):
    # For a compileable cache generate turns its 2D attention mask (None when all ones) into
    # 4D or per-layer-type masks; the 2D one (the prompt's padding) is kept for the forward.
    @functools.wraps(prepare)
    def wrapped(*args, **kwargs):
        call = backend.generating
        if call is not None:
            mask = kwargs.get("attention_mask")
            call.prepared = True
            call.mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        return prepare(*args, **kwargs)

    return wrapped


@contextlib.contextmanager
def _no_cache_implementation(model: nn.Module, kwargs: dict):
    """For one ``generate`` call: no ``cache_implementation`` (the argument, the given generation
    config or the model's, which generate falls back on), as the backend's PrunedCache, itself
    static, takes its place. The caches it cannot stand in for are refused."""
    given = kwargs.get("generation_config")
    default = model.generation_config
    wanted = kwargs.pop("cache_implementation", None) or next(
        (
            c.cache_implementation
            for c in (given, default)
            if c is not None and c.cache_implementation
        ),
        None,
    )
    if wanted is not None and wanted not in REPLACEABLE_CACHES:
        raise ValueError(
            f"csp_inductor stores the KV cache in its own pruned static cache; got "
            f"cache_implementation={wanted!r}, allowed: None or one of {REPLACEABLE_CACHES}"
        )
    if given is not None and given.cache_implementation is not None:
        kwargs["generation_config"] = given = copy.deepcopy(given)
        given.cache_implementation = None
    saved, default.cache_implementation = default.cache_implementation, None
    try:
        yield
    finally:
        default.cache_implementation = saved


def attn_implementations(model: nn.Module) -> dict | str:
    """The attention implementation of the model's config and of each of its sub-configs."""
    config = model.config
    subs = getattr(config, "sub_configs", {}) or {}
    if not subs:
        return config._attn_implementation
    return {
        "": config._attn_implementation,
        **{
            name: getattr(config, name)._attn_implementation
            for name in subs
            if getattr(config, name, None) is not None
        },
    }
