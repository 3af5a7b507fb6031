"""``csp_inductor.compile(model)``: route a transformers (VL)M's decoder through the backend.

What it changes, all undone by :func:`restore`:

1. registers the ``"csp_inductor"`` attention and mask functions with transformers and selects
   them for the text decoder only (the vision tower keeps its own attention); the decoder and
   its layers are detected from the model (:func:`~csp_inductor.integration.detect`);
2. adds a forward pre/post hook pair on the model: before a forward it computes the prompt's
   modality and padding, gives the forward a :class:`~csp_inductor.cache.PrunedCache` when it
   has none, and allocates the cache for the policy's kept count; after it, it advances the
   cache's lengths (outside the compiled graph);
3. wraps ``generate`` so the cache's decode capacity matches ``max_new_tokens``;
4. compiles the decoder's forward with ``torch.compile(fullgraph=True, dynamic=True)``
   (:class:`CompiledForward`): a graph for the prefill (attention + scoring + selection +
   compaction, the last three inside the ``csp_inductor::compact_`` op), one for decode
   steps and one for the later turns of a conversation, each for batch 1 and for larger
   batches, whatever the prompt lengths, decode capacities and policies; a compiler failure
   falls back to eager with one warning.

A conversation continues a cache: the first forward of a ``generate`` call on a cache that
holds a prompt (or, outside ``generate``, any forward of several tokens) is a turn, prefilled
against the kept prefix and pruned by the policy as a prompt of its own length. With
``max_cache_tokens`` the cache is re-pruned by the policy whenever it is full.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import math
import sys
import types
import unittest.mock
import warnings
from typing import NamedTuple

import torch
import torch._inductor.fx_passes.decompose_mem_bound_mm as _decompose_mm
from torch import nn
from transformers import AttentionInterface
from transformers.cache_utils import Cache
from transformers.masking_utils import AttentionMaskInterface

try:
    from transformers.utils import output_capturing as _output_capturing
except ImportError:  # a transformers without output capturing: nothing to reset
    _output_capturing = None

from . import compat
from .attention import FLEX_BLOCK, choose_kernel, decode_block_mask, leading_padding
from .cache import LayerSpec, PrunedCache
from .distributed import check_layout
from .fused import COMPILER_ERRORS
from .integration import Family, csp_attention, detect, modality, model_mask, self_attention
from .ops import register_policy
from .policies import CSP, Full, Policy, Reconstruction

ATTN_NAME = "csp_inductor"
DEFAULT_DECODE_CAPACITY = 256


LEGACY_CACHE_ARG = "past_key_values"
# generate's cache_implementation values that the pruned (static) cache stands in for
REPLACEABLE_CACHES = ("static", "dynamic", "hybrid", "sliding_window")


def _rename_legacy_cache_arg(kwargs: dict, cache_arg: str) -> None:
    """Move a cache passed as ``past_key_values`` to ``cache_arg`` (in place)."""
    if cache_arg != LEGACY_CACHE_ARG and LEGACY_CACHE_ARG in kwargs:
        if kwargs.get(cache_arg) is not None:
            raise TypeError(f"got both {cache_arg!r} and {LEGACY_CACHE_ARG!r}; pass {cache_arg!r}")
        kwargs[cache_arg] = kwargs.pop(LEGACY_CACHE_ARG)


class Backend:
    """The per-model state shared by the hooks, the attention function and the cache."""

    def __init__(
        self,
        model: nn.Module,
        policy: Policy,
        *,
        kernel: str = "auto",
        decode_capacity: int = DEFAULT_DECODE_CAPACITY,
        compile: bool = True,
        dynamic: bool = True,
        decode_softmax_n: float | None = None,
        max_cache_tokens: int | None = None,
    ):
        if not isinstance(decode_capacity, int) or decode_capacity < 1:
            raise ValueError(
                f"decode_capacity must be an int >= 1, got decode_capacity={decode_capacity!r}"
            )
        if decode_softmax_n is not None and not (
            isinstance(decode_softmax_n, (int, float)) and 0 < decode_softmax_n < math.inf
        ):
            raise ValueError(
                "decode_softmax_n must be None (ordinary softmax) or a finite number > 0, got "
                f"decode_softmax_n={decode_softmax_n!r}"
            )
        self.null_logit = None if decode_softmax_n is None else math.log(decode_softmax_n)
        if max_cache_tokens is not None and (
            not isinstance(max_cache_tokens, int) or max_cache_tokens < 2
        ):
            raise ValueError(
                "max_cache_tokens must be None (no bound) or an int >= 2, got "
                f"max_cache_tokens={max_cache_tokens!r}"
            )
        self.max_cache_tokens = max_cache_tokens
        self.model = model
        self.family: Family = detect(model, ATTN_NAME)
        self.decoder = self.family.decoder
        # over how many tensor-parallel ranks each layer's heads are split (1: not split)
        self.head_shards = check_layout(model, self._attention_modules("attention", "shared"))
        self.policy_index = torch.zeros((), dtype=torch.long)  # read by the compiled graph
        # what a prompt's or turn's compaction keeps: the policy's, or everything (a prompt
        # before its re-read, a turn of a policy that scores prompts only)
        self.prefill_index = torch.zeros((), dtype=torch.long)
        self.reread: Reread | None = None  # the running re-read of a prompt
        self.reread_next = False  # the running prompt is to be re-read after its forward
        self.prompt_embeds: tuple | None = None  # its embeddings, modality, padding, next position
        self.policy = policy
        device = next(self.decoder.parameters()).device
        self.kernel = choose_kernel(kernel, device)
        self.decode_capacity = decode_capacity
        self.compile, self.dynamic = compile, dynamic
        self.compiled: CompiledForward | None = None  # the compiled decoder forward
        self.head: CompiledHead | None = None  # the compiled LM head of decode steps
        self.active: PrunedCache | None = None  # the cache of the running forward, if any
        self.cache = self.new_cache()  # the cache of the last forward that had one
        self.is_image: torch.Tensor | None = None
        self.key_padding: torch.Tensor | None = None
        self.starts: torch.Tensor | None = None
        self.hidden: torch.Tensor | None = None  # (batch, capacity): a turn's padding slots
        # flex decode masks by (new tokens per step or "turn", layer or None for global layers)
        self.block_masks: dict[tuple[int | str, int | None], object] = {}
        # forwards of the running generate call so far (None: not generating); the first one
        # on a cache holding a conversation is a new turn, later ones decode steps
        self.generate_forwards: int | None = None
        self.reserve = 0  # decode room a turn makes beside its own tokens
        self.repruner = None  # the (compiled) re-prune of a bounded cache, made when needed
        # the 2D attention mask generate had for its next forward (None = no padding)
        self.from_generate, self.prompt_mask = False, None
        # a policy that ranks by the layers' own inputs: what hooks collected of them during
        # the running (eager) forward, by layer, and the hooks' undo
        self.layer_inputs: dict[int, dict] = {}
        self._collecting: list = []
        self._undo: list = []

    @property
    def policy(self) -> Policy:
        """What the next prefill keeps. Assignable: a new policy takes effect at the next
        prompt, without recompiling (the graph reads the policy as a tensor)."""
        return self._policy

    @policy.setter
    def policy(self, policy: Policy) -> None:
        if not isinstance(policy, Policy):
            raise TypeError(
                f"policy must be a csp_inductor Policy (CSP(), SnapKV(budget=0.2), ...), got "
                f"policy={policy!r}"
            )
        self._check_bound(policy)
        self._check_reread(policy)
        self._check_layer_inputs(policy)
        index = register_policy(policy)
        self._policy = policy
        self.policy_index.fill_(index)

    @property
    def graphs(self) -> int:
        """Graphs compiled for the decoder so far (0 with ``compile=False``)."""
        return 0 if self.compiled is None else self.compiled.graphs

    @property
    def fallback(self) -> str | None:
        """Why the compiled decoder runs eagerly (a compiler failure), or None."""
        return None if self.compiled is None else self.compiled.failure

    @property
    def head_fallback(self) -> str | None:
        """Why the LM head runs its own forward in decode steps (a compiler failure), or None."""
        return None if self.head is None else self.head.failure

    # --- set-up and undo --------------------------------------------------------------------
    def install(self) -> None:
        model = self.model
        AttentionInterface.register(ATTN_NAME, csp_attention)
        AttentionMaskInterface.register(ATTN_NAME, model_mask)
        previous = _attn_implementations(model)
        model.set_attn_implementation(self.family.attn_target)
        self._undo.append(lambda: model.set_attn_implementation(previous))
        for attn in self._attention_modules("attention", "shared").values():  # ours to serve
            attn.csp_backend = self
            self._undo.append(functools.partial(delattr, attn, "csp_backend"))
        # positional forward arguments are named once, not per decode step
        self.forward_params = list(inspect.signature(model.forward).parameters)
        # transformers 5.24 renamed the cache argument (the old name still works, deprecated)
        self.cache_arg = "cache" if "cache" in self.forward_params else LEGACY_CACHE_ARG
        pre = model.register_forward_pre_hook(self._before_forward, with_kwargs=True)
        post = model.register_forward_hook(self._after_forward, with_kwargs=True)
        embeds = self.decoder.register_forward_pre_hook(self._capture_prompt, with_kwargs=True)
        self._undo += [pre.remove, post.remove, embeds.remove]
        decoder_params = inspect.signature(self.decoder.forward).parameters
        self.decoder_cache_arg = "cache" if "cache" in decoder_params else LEGACY_CACHE_ARG
        model.generate = functools.wraps(model.generate)(self._generate(model.generate))
        self._undo.append(functools.partial(delattr, model, "generate"))
        prepare = model.prepare_inputs_for_generation
        model.prepare_inputs_for_generation = functools.wraps(prepare)(
            self._prepare_inputs(prepare)
        )
        self._undo.append(functools.partial(delattr, model, "prepare_inputs_for_generation"))
        if self.compile:
            decoder = self.decoder
            decoder.forward = self.compiled = CompiledForward(
                decoder.forward, dynamic=self.dynamic, keep_mask=self.family.recurrent
            )
            self._undo.append(functools.partial(delattr, decoder, "forward"))
            head = (
                model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            )
            if type(head) is nn.Linear:  # (a subclass may compute something else)
                head.forward = self.head = CompiledHead(head)
                self._undo.append(functools.partial(delattr, head, "forward"))
        model.csp_backend = self
        self._undo.append(functools.partial(delattr, model, "csp_backend"))

    def uninstall(self) -> None:
        self._stop_collecting()  # (a failed forward's)
        while self._undo:
            self._undo.pop()()

    # --- caches -------------------------------------------------------------------------------
    def layer_specs(self) -> list[LayerSpec]:
        specs, family = [], self.family
        for i, (layer, kind) in enumerate(
            zip(self.decoder.layers, family.layer_types, strict=True)
        ):
            if kind == "recurrent":
                specs.append(LayerSpec(kind="recurrent", states=family.states[i]))
            elif kind in ("shared", "none"):
                specs.append(LayerSpec(kind=kind))
            else:
                specs.append(_attention_spec(layer, family.windows[i], self.head_shards[i]))
        return specs

    @functools.cached_property
    def scales(self) -> tuple[float, ...]:
        """The logit scale of each layer the cache stores K/V for (its module's ``scaling``)."""
        return tuple(
            float(getattr(attn, "scaling", None) or attn.head_dim**-0.5)
            for attn in self._attention_modules("attention").values()
        )

    def _attention_modules(self, *kinds: str) -> dict[int, nn.Module]:
        """The self-attention modules of the decoder's layers of these kinds, by layer."""
        layers = enumerate(zip(self.decoder.layers, self.family.layer_types, strict=True))
        return {i: self_attention(layer) for i, (layer, kind) in layers if kind in kinds}

    def _check_bound(self, policy: Policy) -> None:
        """A bounded cache needs a policy that frees room in a full cache and scores it with
        the recent queries it keeps (or with none)."""
        bound = self.max_cache_tokens
        if bound is None:
            return
        if policy.budget_for(bound).keep_all:
            raise ValueError(
                f"max_cache_tokens={bound} needs a policy that prunes a cache of {bound} tokens; "
                f"{policy!r} keeps them all"
            )
        if policy.scores_every_query:
            raise ValueError(
                f"max_cache_tokens needs a policy that scores with the recent queries (CSP, "
                f"SnapKV) or none (StreamingLLM, KNorm, RandomKeep); {policy!r} scores with "
                "every query, which a cache does not keep"
            )
        if any(spec.latent for spec in self.layer_specs()):
            raise ValueError(
                f"max_cache_tokens is not supported for {type(self.model).__name__}: its "
                "multi-head latent attention caches a latent the re-prune cannot score"
            )

    def _check_reread(self, policy: Policy) -> None:
        """A question-agnostic policy re-reads the prompt through the decoder: not on models
        whose layers share K/V or store a latent, not under a bound."""
        if policy.reconstruction is None:
            return
        why = None
        if self.family.kv_source:
            why = "its layers share K/V and compute only the last queries of a later input"
        elif self.family.recurrent:
            why = "its recurrent layers would read the prompt into their state a second time"
        elif any(spec.latent for spec in self.layer_specs()):
            why = "its multi-head latent attention caches a latent the re-read cannot score"
        elif self.max_cache_tokens is not None:
            why = "max_cache_tokens re-prunes with the recent queries; use a window policy"
        if why is not None:
            raise ValueError(
                f"{policy!r} scores the prompt by re-reading it, which is not supported for "
                f"{type(self.model).__name__}: {why}"
            )

    def _check_layer_inputs(self, policy: Policy) -> None:
        """A policy that ranks by the layers' inputs scores prompts only (it keeps turns
        whole): not the held tokens of a bounded cache, nor a latent."""
        if not policy.needs_layer_inputs:
            return
        why = None
        if self.max_cache_tokens is not None:
            why = "max_cache_tokens re-prunes held tokens, whose layer inputs are gone"
        elif any(spec.latent for spec in self.layer_specs()):
            why = "its multi-head latent attention caches a latent, not the keys it would score"
        if why is not None:
            raise ValueError(
                f"{policy!r} ranks by each layer's inputs, which is not supported for "
                f"{type(self.model).__name__}: {why}"
            )

    def _collect_layer_inputs(self) -> None:
        """For this forward (run eagerly): each pruned attention layer's forward arguments,
        for :meth:`Policy.layer_scores`, and the decoder's rotary embedding on each layer's
        module (kvpress's scorers rebuild queries with it)."""
        if self.key_padding is not None and bool(self.key_padding.any()):
            raise ValueError(
                f"{self.policy!r} scores prompts without a padding mask (kvpress's scorers "
                "have none); send rows of equal length (or one at a time)"
            )
        self.policy.prepare(self.model)
        if self.compiled is not None:
            self.compiled.eager_next = True
        rotary = getattr(self.decoder, "rotary_emb", None)
        if rotary is not None and "layer_type" in inspect.signature(rotary.forward).parameters:
            rotary = None  # (Gemma 3's: one per layer type, which kvpress's presses do not pass)
        for layer, kind in zip(self.decoder.layers, self.family.layer_types, strict=True):
            if kind != "attention":
                continue
            attn = self_attention(layer)
            collect = functools.partial(self._collect, inspect.signature(attn.forward))
            hook = attn.register_forward_pre_hook(collect, with_kwargs=True)
            self._collecting.append(hook.remove)
            if rotary is not None and not hasattr(attn, "rotary_emb"):
                attn.rotary_emb = rotary
                self._collecting.append(functools.partial(delattr, attn, "rotary_emb"))

    def _collect(self, signature, module, args, kwargs) -> None:
        """An attention layer's forward arguments by name (its ``**kwargs`` among them)."""
        named = signature.bind_partial(*args, **kwargs).arguments
        for param in signature.parameters.values():
            if param.kind is param.VAR_KEYWORD:
                named.update(named.pop(param.name, {}))
        self.layer_inputs[module.layer_idx] = dict(named)

    def _stop_collecting(self) -> None:
        while self._collecting:
            self._collecting.pop()()
        self.layer_inputs.clear()
        if self.compiled is not None:
            self.compiled.eager_next = False

    def new_cache(self, decode_capacity: int | None = None) -> PrunedCache:
        """An empty cache for one prompt (batch) with room for ``decode_capacity`` new tokens."""
        # Compiled flex on CPU (torch 2.13) returns wrong results when the KV length is below
        # one block and differs from the query length: flex buffers are whole blocks.
        align = FLEX_BLOCK if self.kernel == "flex" else 1
        bound, window = self.max_cache_tokens, 0
        if bound is not None and self.policy.window_n is not None:
            window = self.policy.budget_for(bound).window  # the scoring window of a full cache
        return PrunedCache(
            self.layer_specs(), decode_capacity or self.decode_capacity, align,
            null_slot=self.null_logit is not None, bound=bound, window=window,
        )  # fmt: skip

    def _generate(self, generate):
        def wrapped(*args, **kwargs):
            _rename_legacy_cache_arg(kwargs, self.cache_arg)
            config = kwargs.get("generation_config") or self.model.generation_config
            use_cache = kwargs.get("use_cache", config.use_cache)
            new = kwargs.get("max_new_tokens") or config.max_new_tokens or self.decode_capacity
            if use_cache is not False and kwargs.get(self.cache_arg) is None:
                kwargs[self.cache_arg] = self.new_cache(new)
            self.generate_forwards, self.reserve = 0, new
            # generate compiles the whole forward on GPUs when the cache is compileable; the
            # backend compiles the decoder itself, and its hooks run eagerly around it
            kwargs.setdefault("disable_compile", True)
            try:
                with _no_cache_implementation(self.model, kwargs):
                    return generate(*args, **kwargs)
            finally:
                self.generate_forwards, self.reserve = None, 0

        return wrapped

    def _prepare_inputs(self, prepare):
        # For a compileable cache generate turns its 2D attention mask (None when all ones) into
        # 4D or per-layer-type masks; the 2D one (the prompt's padding) is kept for the forward.
        def wrapped(*args, **kwargs):
            mask = kwargs.get("attention_mask")
            self.from_generate = True
            self.prompt_mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
            return prepare(*args, **kwargs)

        return wrapped

    # --- hooks (eager, outside the compiled decoder) ------------------------------------------
    def _before_forward(self, module, args, kwargs):
        kwargs = dict(kwargs)
        for name, value in zip(self.forward_params, args, strict=False):
            kwargs.setdefault(name, value)
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        batch, q_len = (ids if ids is not None else embeds).shape[:2]
        _rename_legacy_cache_arg(kwargs, self.cache_arg)
        cache = kwargs.get(self.cache_arg)
        if isinstance(cache, PrunedCache) and cache.phase == "turn":
            cache.abandon_turn()  # the forward of the last turn raised: the cache is as before
        self.reread_next, self.prompt_embeds = False, None  # a failed prompt's, if any
        self._stop_collecting()
        if isinstance(cache, PrunedCache) and cache.phase == "reread":
            raise RuntimeError(
                "this PrunedCache's prompt failed while being re-read to prune it; it holds an "
                "unpruned prompt: create a new cache and send the prompt again"
            )
        if kwargs.get("use_cache") is False:
            cache = kwargs[self.cache_arg] = None
        elif not isinstance(cache, PrunedCache):
            if isinstance(cache, Cache) and int(cache.get_seq_length()) > 0:
                raise TypeError(
                    f"csp_inductor cannot continue a non-empty {type(cache).__name__}; pass a "
                    "PrunedCache (backend.new_cache()) or none"
                )
            cache = self.new_cache()
            kwargs[self.cache_arg] = cache
        mask = kwargs.get("attention_mask")
        from_generate, prompt_mask = self.from_generate, self.prompt_mask
        # generate's 2D mask serves this forward only, whether it succeeds or raises
        self.from_generate, self.prompt_mask = False, None
        first = self.generate_forwards in (None, 0)  # a plain forward or generate's first
        if self.generate_forwards is not None:
            self.generate_forwards += 1
        token_types = kwargs.get("mm_token_type_ids")
        if cache is None or cache.phase == "empty":
            mask = _padding_mask(mask, prompt_mask, from_generate)
            self._prepare_prompt(ids, token_types, mask, batch, q_len, cache)
        elif first and q_len > 1:
            mask = _padding_mask(mask, prompt_mask, from_generate)
            self._prepare_turn(ids, token_types, mask, batch, q_len, cache)
        else:
            self._make_room(cache, q_len)
        self.active = cache
        if cache is not None:
            self.cache = cache
        if cache is not None and cache.phase in ("decode", "turn") and self.kernel == "flex":
            self._build_block_masks(cache, q_len)
        return (), kwargs

    def _modality(self, ids, token_types, batch: int, q_len: int) -> torch.Tensor:
        """(batch, q_len) bool: the visual tokens among the forward's ``q_len`` tokens."""
        if ids is not None:
            ids = ids[:, -q_len:]
        if token_types is not None:
            token_types = token_types[:, -q_len:]
        is_image = modality(self.family, ids, token_types)
        if is_image is not None:
            return is_image
        if self.family.multimodal:
            raise ValueError(
                "csp_inductor needs input_ids (or mm_token_type_ids) with a prompt or a turn to "
                "know which of its tokens are visual; got inputs_embeds only"
            )
        device = next(self.decoder.parameters()).device
        return torch.zeros(batch, q_len, dtype=torch.bool, device=device)

    def _prepare_turn(self, ids, token_types, mask, batch, q_len, cache) -> None:
        """A new turn of a conversation on a cache that holds the earlier ones: its tokens see
        the kept prefix, and the policy prunes them as a prompt of their own length."""
        if self.family.kv_source:
            raise ValueError(
                f"csp_inductor cannot continue a conversation on {type(self.model).__name__}: "
                "its layers share K/V and compute only the last queries of a turn; start a new "
                "cache per prompt"
            )
        if mask is not None:
            seen = int(cache.seen)
            if mask.shape[1] not in (q_len, seen + q_len):
                raise ValueError(
                    f"attention_mask must cover the turn's {q_len} new tokens, or the whole "
                    f"conversation ({seen} earlier + {q_len} new = {seen + q_len}); got "
                    f"attention_mask.shape={tuple(mask.shape)}"
                )
            if mask.shape[1] > q_len:
                earlier = (mask[:, :-q_len] == 0).sum(dim=1).tolist()
                if earlier != cache.padding:
                    raise ValueError(
                        "attention_mask must mask, before the new turn, exactly the padding of "
                        f"the earlier turns ({cache.padding} tokens per row); got {earlier}: "
                        "tokens already in the cache cannot be masked afterwards"
                    )
        is_image = self._modality(ids, token_types, batch, q_len)
        padding, pads = _padding(mask, batch, q_len, is_image.device)
        kept = [self.policy.budget_for(q_len - p).kept for p in pads]
        # what the turn's compaction keeps: the policy's; a policy scored by its layers' inputs
        # (kvpress's presses) prunes prompts only and keeps a turn whole, as kvpress does
        self.prefill_index.fill_(self.policy_index)
        if self.policy.needs_layer_inputs:
            kept = [q_len - p for p in pads]
            self.prefill_index.fill_(register_policy(Full()))
        if cache.bound is not None:  # (an unbounded cache grows for the turn and its answer)
            self._make_room(cache, q_len)
        self.is_image, self.key_padding = is_image, padding
        cache.start_turn(q_len, kept, pads, room=self.reserve)
        self.hidden = None
        if padding is not None:
            slots = cache.lengths[:, None] + torch.arange(q_len, device=padding.device)
            capacity = cache.pruned[0].keys.shape[2]
            self.hidden = torch.zeros(batch, capacity, dtype=torch.bool, device=padding.device)
            self.hidden.scatter_(1, slots, padding)
        self.block_masks.clear()

    def _prepare_prompt(self, ids, token_types, mask, batch, q_len, cache) -> None:
        param = next(self.decoder.parameters())
        self.is_image = self._modality(ids, token_types, batch, q_len)
        self.key_padding, pads = _padding(mask, batch, q_len, param.device)
        self.starts = leading_padding(self.key_padding)  # where each row's chunks start
        self.block_masks.clear()
        if cache is None:
            return
        how = self.policy.reconstruction
        if how is not None and all(self.policy.budget_for(q_len - p).keep_all for p in pads):
            how = None  # nothing to prune, nothing to re-read for
        if how is None:
            kept = [self.policy.budget_for(q_len - p).kept for p in pads]
            self.prefill_index.fill_(self.policy_index)
            if self.policy.needs_layer_inputs and kept != [q_len - p for p in pads]:
                self._collect_layer_inputs()
        else:  # everything is kept until the prompt is re-read (_after_forward)
            kept = [q_len - p for p in pads]
            self.prefill_index.fill_(register_policy(Full()))
            self.reread_next = True
        reread = 0 if how is None else how.chunk + self._separator().shape[1]
        cache.start_prefill(kept, param.dtype, param.device, self.starts, pads, q_len, reread)

    def _make_room(self, cache: PrunedCache, q_len: int) -> None:
        """Room for ``q_len`` new tokens: a full bounded cache is re-pruned (refused when even
        that leaves too little), an unbounded one grows."""
        if cache.room() >= q_len:
            return
        if cache.bound is None:
            cache.grow(max(q_len, self.decode_capacity))
            self.block_masks.clear()
            return
        after = max(self.policy.budget_for(n).kept for n in cache.rows)
        if after + q_len > cache.bound:
            raise ValueError(
                f"max_cache_tokens={cache.bound}: {q_len} new tokens do not fit beside the "
                f"{after} tokens a re-prune of the {max(cache.rows)} held keeps; raise the "
                "bound or send fewer tokens at once"
            )
        self._reprune(cache)

    def _reprune(self, cache: PrunedCache) -> None:
        """Prune a full bounded cache again with the policy, each row's held tokens ranked as
        a prompt of that length (one graph serves every re-prune)."""
        kept = [self.policy.budget_for(n).kept for n in cache.rows]
        if kept == cache.rows:
            raise ValueError(
                f"max_cache_tokens={cache.bound}: {self.policy!r} keeps all {cache.rows} tokens "
                "held, so no room can be made; raise the bound or lower the budget"
            )
        if self.repruner is None:
            self.repruner = _reprune_layers
            if self.compile:
                self.repruner = torch.compile(_reprune_layers, fullgraph=True, dynamic=True)
        target = torch.tensor(kept, dtype=torch.long, device=cache.lengths.device)
        self.repruner(
            [layer.buffers() for layer in cache.pruned], cache.ring_positions, cache.ring_images,
            cache.lengths, target, self.policy_index, self.scales,
        )  # fmt: skip
        cache.lengths.copy_(target)
        cache.rows = kept
        cache.reprunes += 1

    def _build_block_masks(self, cache: PrunedCache, q_len: int) -> None:
        """The flex masks of a decode step of ``q_len`` new tokens (one token per step, or
        several, as assisted decoding verifies them), built once per prompt and step size, or
        of a turn (its padding hidden)."""
        turn = cache.phase in ("turn", "reread")
        for layer in cache.pruned:
            window, chunk = layer.spec.sliding_window, self.family.chunks[layer.index]
            key = ("turn" if turn else q_len, layer.index if window or chunk else None)
            if key not in self.block_masks:
                self.block_masks[key] = decode_block_mask(
                    cache.lengths, layer.positions, cache.seen, window, layer.spec.q_heads, q_len,
                    null_slot=cache.null_slot, chunk=chunk, starts=cache.starts,
                    hidden=self.hidden if turn else None,
                )  # fmt: skip

    def _after_forward(self, module, args, kwargs, output):
        cache, self.active = self.active, None
        self._stop_collecting()
        if cache is not None:
            ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
            if cache.phase == "turn":  # its masks are its own
                self.block_masks = {k: m for k, m in self.block_masks.items() if k[0] != "turn"}
            cache.advance((ids if ids is not None else embeds).shape[1])
            if self.reread_next:
                self.reread_next = False
                if self.prompt_embeds is None:
                    raise RuntimeError(
                        f"csp_inductor did not see the decoder's input embeddings of the prompt "
                        f"of {type(self.model).__name__}, which {self.policy!r} re-reads"
                    )
                self._reread(cache)
        return output

    # --- question-agnostic scoring: re-reading the prompt -----------------------------------
    def _capture_prompt(self, module, args, kwargs):
        """The decoder's input embeddings of a prompt to re-read (images as the vision tower
        made them)."""
        cache = self.active
        if not self.reread_next or self.prompt_embeds is not None or cache.phase != "prefill":
            return None
        embeds, positions = kwargs.get("inputs_embeds"), kwargs.get("position_ids")
        if embeds is None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            embeds = self.decoder.get_input_embeddings()(ids)
        batch, length = embeds.shape[:2]
        if positions is None:
            positions = torch.arange(length, device=embeds.device).expand(batch, -1)
        # each row's next position: past its last real token's (M-RoPE: on every axis; the
        # text row generate puts first, (4, b, L) on Qwen2-VL, is not one of them)
        positions = positions.reshape(-1, batch, length)
        if positions.shape[0] == 4:
            positions = positions[1:]
        if self.key_padding is not None:
            positions = positions.masked_fill(self.key_padding, -1)
        after = positions.amax(dim=(0, 2)) + 1
        self.prompt_embeds = (embeds.detach(), self.is_image, self.key_padding, after)
        return None

    def _separator(self) -> torch.Tensor:
        """(1, s, hidden): what precedes each re-read chunk, the model's begin-of-text token
        (none if it has none)."""
        embed = self.decoder.get_input_embeddings()
        bos = getattr(self.decoder.config, "bos_token_id", None)
        ids = torch.tensor([[] if bos is None else [bos]], dtype=torch.long)
        return embed(ids.to(embed.weight.device)).detach()

    def _reread(self, cache: PrunedCache) -> None:
        """Score the prompt the cache holds whole by re-reading it, then prune it in place:
        chunks of each row's real tokens, after the separator, run through the decoder as a
        turn that is never kept (each chunk sees the prompt and itself, causally); every
        layer folds the chunk's attention into its scores (``csp_inductor::reconstruct_scores_``);
        the policy then selects with them (``csp_inductor::reprune_``)."""
        embeds, is_image, padding, after = self.prompt_embeds
        self.prompt_embeds = None
        how, policy = self.policy.reconstruction, self.policy
        batch, length, _ = embeds.shape
        real = list(cache.rows)
        sep = self._separator().to(embeds.dtype)
        everything = torch.arange(length, device=embeds.device)
        tokens = [everything] * batch if padding is None else [everything[~row] for row in padding]
        scores = {
            layer.index: torch.zeros(
                batch, layer.spec.kv_heads, 2, layer.keys.shape[2], device=embeds.device
            )
            for layer in cache.pruned
        }
        try:
            for lo in range(0, max(real), how.chunk):
                chunk = _reread_chunk(embeds, is_image, tokens, lo, how, sep)
                self.reread = Reread(scores, chunk.scored, chunk.is_image, policy, how)
                self._forward_reread(cache, chunk, after)
        finally:
            self.reread, self.active, self.hidden = None, None, None
            self.block_masks = {k: m for k, m in self.block_masks.items() if k[0] != "turn"}
        kept = [policy.budget_for(n).kept for n in real]
        target = torch.tensor(kept, dtype=torch.long, device=cache.lengths.device)
        for layer, scale in zip(cache.pruned, self.scales, strict=True):
            torch.ops.csp_inductor.reprune_(
                layer.keys, layer.values, layer.positions, layer.images, None, None, None,
                cache.lengths, target, self.policy_index, scale, scores[layer.index],
            )  # fmt: skip
        cache.finish_reread(kept)

    def _forward_reread(self, cache: PrunedCache, chunk: RereadChunk, after) -> None:
        """One chunk through the decoder; its tokens follow each row's prompt (``after`` (b,),
        the position after the row's last) as a next turn's would."""
        batch, width = chunk.padding.shape
        slots = cache.lengths[:, None] + torch.arange(width, device=chunk.padding.device)
        self.hidden = torch.zeros(
            batch, cache.pruned[0].keys.shape[2], dtype=torch.bool, device=chunk.padding.device
        ).scatter_(1, slots, chunk.padding)
        cache.phase, self.active = "reread", cache
        if self.kernel == "flex":
            self._build_block_masks(cache, width)
        steps = torch.arange(width, device=slots.device)
        positions = after[:, None] + steps - chunk.padding.sum(dim=1, keepdim=True)
        with torch.no_grad():
            self.decoder(
                inputs_embeds=chunk.embeds, position_ids=positions, use_cache=True,
                **{self.decoder_cache_arg: cache},
            )  # fmt: skip
        self.block_masks = {k: m for k, m in self.block_masks.items() if k[0] != "turn"}


class Reread(NamedTuple):
    """A running re-read: each layer's scores (b, hkv, 2, capacity) by layer index, and the
    chunk's scored queries and their modality (b, width)."""

    scores: dict[int, torch.Tensor]
    scored: torch.Tensor
    is_image: torch.Tensor
    policy: Policy
    how: Reconstruction


class RereadChunk(NamedTuple):
    embeds: torch.Tensor  # (b, width, hidden), left-padded
    padding: torch.Tensor  # (b, width) bool
    scored: torch.Tensor  # (b, width) bool: the queries whose attention scores the prompt
    is_image: torch.Tensor  # (b, width) bool


def _reread_chunk(embeds, is_image, tokens: list, lo: int, how, sep) -> RereadChunk:
    """Row ``b``'s real prompt tokens ``tokens[b][lo : lo + chunk]`` (positions in the
    prompt) after the separator, left-padded to the batch's widest (a row with none left is
    all padding)."""
    batch, _, hidden = embeds.shape
    take = [max(0, min(how.chunk, len(row) - lo)) for row in tokens]
    width = sep.shape[1] + max(take)
    device = embeds.device
    out = embeds.new_zeros(batch, width, hidden)
    padding = torch.ones(batch, width, dtype=torch.bool, device=device)
    scored = torch.zeros_like(padding)
    images = torch.zeros_like(padding)
    for row, count in enumerate(take):
        if not count:
            continue
        picked = tokens[row][lo : lo + count]
        out[row, width - count :] = embeds[row, picked]
        out[row, width - count - sep.shape[1] : width - count] = sep[0]
        padding[row, width - count - sep.shape[1] :] = False
        images[row, width - count :] = is_image[row, picked]
        scored[row, width - count :] = True
    if how.queries == "text":
        scored &= ~images
    return RereadChunk(out, padding, scored, images)


def _padding(mask, batch: int, q_len: int, device) -> tuple[torch.Tensor | None, list[int]]:
    """The padding of a forward's ``q_len`` tokens from its 2D mask, (batch, q_len) bool, and
    its count per row. A padding tensor whenever the batch has more than one row, padded or
    not (one graph serves both); None for a lone row without padding (the faster path)."""
    padding = None if mask is None else ~mask[:, -q_len:].bool()
    if batch == 1 and (padding is None or not bool(padding.any())):
        return None, [0]
    if padding is None:
        padding = torch.zeros(batch, q_len, dtype=torch.bool, device=device)
    return padding, padding.sum(dim=1).tolist()


def _padding_mask(mask, prompt_mask, from_generate: bool) -> torch.Tensor | None:
    """The 2D attention mask a prompt or turn is padded by: the forward's, or the one generate
    had before it made a 4D one."""
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        return mask
    if mask is not None and not from_generate:
        raise ValueError(
            "csp_inductor reads the prompt's padding from a 2D attention_mask (batch, seq); got "
            f"{type(mask).__name__}{tuple(mask.shape) if isinstance(mask, torch.Tensor) else ''}"
        )
    return prompt_mask


def _reprune_layers(buffers, ring_positions, ring_images, lengths, kept, policy, scales):
    """Every layer's re-prune: ``buffers[i]`` a layer's (keys, values, positions, images,
    queries or nothing)."""
    for layer, scale in zip(buffers, scales, strict=True):
        keys, values, positions, images, *queries = layer
        torch.ops.csp_inductor.reprune_(
            keys, values, positions, images, queries[0] if queries else None, ring_positions,
            ring_images, lengths, kept, policy, scale,
        )  # fmt: skip


# Outputs that transformers records with a context manager Dynamo cannot trace: a call that
# asks for them runs eagerly (that call only).
EAGER_OUTPUTS = ("output_hidden_states", "output_attentions")


class CompiledForward:
    """The decoder's forward, compiled with ``fullgraph=True``, falling back to eager.

    Dynamo keys graphs, and counts its recompile limit, per code object. transformers'
    decorated forwards share one wrapper code object across all models, so compiling
    ``decoder.forward`` directly pools the graphs of every model, batch size and policy of a
    process under one limit. The compiled function here is a trampoline with a code object of
    its own, so each backend has its own graphs and its own limit (Dynamo's much larger
    ``accumulated_recompile_limit`` stays process-wide).

    When the compiler fails (the limit reached, or an error in Dynamo or Inductor), the call is
    run eagerly (same function, same results) and so is every later call; one warning says
    why. Errors of the model's own code are raised by the eager run, as without compilation.
    A call asking for hidden states or attention weights runs eagerly, by itself, as does one
    the backend marks (``eager_next``: a prompt scored from its layers' inputs by Python code).
    ``graphs`` counts the graphs compiled for this decoder.
    """

    def __init__(self, forward, *, dynamic: bool, keep_mask: bool = False):
        self.eager = forward
        self.keep_mask = keep_mask
        self.graphs = 0  # graphs compiled so far
        self.failure: str | None = None  # why this forward runs eagerly, once it does
        self.eager_next = False  # the next call runs eagerly (set by the backend)

        self.signature = inspect.signature(forward)

        own = _own_code(forward, f"csp_decoder_forward_{id(self):x}")
        self.compiled = torch.compile(own, backend=self._inductor, fullgraph=True, dynamic=dynamic)

    def _inductor(self, graph, example_inputs):
        # bf16/fp16 intermediates rounded where eager rounds them (Inductor would keep fused
        # chains in fp32): the compiled decoder then gives the eager model's tokens, which
        # keeping more precision flips on close calls (a no-op for fp32 models)
        with torch._inductor.config.patch(emulate_precision_casts=True), _one_row_products():
            compiled = torch._dynamo.lookup_backend("inductor")(graph, example_inputs)
        self.graphs += 1  # counted once compiled: Dynamo may restart an analysis mid-way
        return compiled

    def __call__(self, *args, **kwargs):
        eager, self.eager_next = self.eager_next, False
        if eager or self.failure is not None or any(kwargs.get(name) for name in EAGER_OUTPUTS):
            return self.eager(*args, **kwargs)
        # Every parameter by name, defaults included: a plain forward and generate (which pass
        # different subsets) then differ in values only, not in the arity Dynamo guards on.
        # A 2D attention mask is not passed (the backend's attention applies the padding
        # itself), so it is not a guard (None vs tensor), except where recurrent layers read it.
        # Masks the model built already (a dict or 4D: its bidirectional blocks) are passed.
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        mask = bound.arguments.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and not self.keep_mask:
            bound.arguments["attention_mask"] = None
        try:
            # No duck sizing: a prompt as long as the hidden size would otherwise share the
            # hidden dim's symbol, be specialised with it by the weights' matmul, and make the
            # first prefill graph static, recompiling at the next prompt length.
            positional, named = _by_name(bound)
            with torch.fx.experimental._config.patch(use_duck_shape=False):
                return self.compiled(*positional, **named)
        except COMPILER_ERRORS as error:
            out = self.eager(*args, **kwargs)  # the model's own errors surface here
            self.failure = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
            warnings.warn(
                f"csp_inductor: torch.compile failed on the decoder ({self.failure}); it runs "
                "eagerly from now on, with the same results. A recompile limit means the inputs "
                "varied in a way the graphs do not cover (TORCH_LOGS=recompiles shows how; "
                "torch._dynamo.config.recompile_limit raises the limit); compile(model, "
                "compile=False) runs eagerly from the start.",
                RuntimeWarning,
                stacklevel=2,
            )
            return out
        finally:
            _reset_output_capturing()


# The most rows (tokens of a step, over the batch) for which the LM head streams its weight as
# one fused multiply-and-sum, by weight dtype; past them the reduction re-reads the weight per
# row and a matrix product is faster. Measured on a 32000 x 1024 head (bench/README.md).
HEAD_REDUCTION_ROWS = {torch.float32: 4, torch.bfloat16: 2}


def _head_reduction(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    if not torch.compiler.is_compiling():  # (Dynamo disabled: never the (rows, V, H) product)
        return torch.nn.functional.linear(hidden, weight, bias)
    logits = (hidden[..., None, :] * weight).sum(dim=-1)
    return logits if bias is None else logits + bias


class CompiledHead:
    """The LM head of a decode step as one compiled reduction over its weight.

    A decode step multiplies a hidden state per row by the (vocab, hidden) weight: a
    matrix-vector product that streams the largest matrix of the model once. MKL's GEMV reads
    such a weight, larger than the last-level cache, at half the machine's read bandwidth;
    Inductor's fused multiply-and-sum streams it at about the read bandwidth (bench/README.md).
    Used for a plain ``nn.Linear`` with a CPU weight (a plain tensor: not split by a TP plan)
    of a dtype in :data:`HEAD_REDUCTION_ROWS`, at most that many rows and no autocast; anything
    else, and every call after a compiler failure (one warning), runs the module's own forward.
    Like the decoder's, its graphs have their own code object and recompile limit.
    """

    def __init__(self, head: nn.Linear):
        self.head = head
        self.eager = head.forward
        self.graphs = 0  # graphs compiled so far
        self.failure: str | None = None  # why the head runs its own forward, once it does
        own = _own_code(_head_reduction, f"csp_lm_head_{id(self):x}")
        self.compiled = torch.compile(own, backend=self._inductor, fullgraph=True, dynamic=True)

    def _inductor(self, graph, example_inputs):
        compiled = torch._dynamo.lookup_backend("inductor")(graph, example_inputs)
        self.graphs += 1
        return compiled

    def __call__(self, input: torch.Tensor) -> torch.Tensor:  # (nn.Linear.forward's name)
        weight = self.head.weight
        rows = input.numel() // max(1, input.shape[-1])
        if (
            self.failure is not None or weight.device.type != "cpu"
            or type(weight.data) is not torch.Tensor or input.dtype != weight.dtype
            or rows > HEAD_REDUCTION_ROWS.get(weight.dtype, 0)
            or torch.is_autocast_enabled("cpu")
        ):  # fmt: skip
            return self.eager(input)
        try:
            # a fresh 2D copy (a few rows): the prompt's last token (a slice, at an offset into
            # its storage) and a step's hidden states share one graph
            flat = input.reshape(rows, input.shape[-1]).clone()
            return self.compiled(flat, weight, self.head.bias).view(*input.shape[:-1], -1)
        except COMPILER_ERRORS as error:
            self.failure = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
            warnings.warn(
                f"csp_inductor: torch.compile failed on the LM head ({self.failure}); it runs "
                "its own forward from now on, with the same results.",
                RuntimeWarning,
                stacklevel=3,
            )
            return self.eager(input)


@contextlib.contextmanager
def _one_row_products():
    """While Inductor compiles: a one-row matrix product on the CPU (every linear layer of a
    batch-1 decode step) becomes a fused multiply-and-sum, which streams the weight at about
    the read bandwidth where MKL's GEMV gets half of it (bench/README.md). Inductor's pass
    stops at weights of 2048 per side by default; here any size."""
    options = {**torch._inductor.config.post_grad_fusion_options, "decompose_mm_pass": {}}
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch._inductor.config.patch(post_grad_fusion_options=options))
        limit = "cpu_max_other_dimension_decomposition"
        if hasattr(_decompose_mm, limit):  # (a module-level limit in torch 2.13)
            stack.enter_context(unittest.mock.patch.object(_decompose_mm, limit, sys.maxsize))
        yield


def _own_code(fn, name: str):
    """``fn`` behind a trampoline with a code object of its own, named ``name``: Dynamo keys
    graphs and its recompile limit by code object, so what is compiled from it is counted
    apart from every other caller of ``fn``."""

    def trampoline(*args, **kwargs):
        return fn(*args, **kwargs)

    code = trampoline.__code__.replace(co_name=name)
    return types.FunctionType(code, trampoline.__globals__, name, None, trampoline.__closure__)


def _by_name(bound: inspect.BoundArguments) -> tuple[tuple, dict]:
    """``bound``'s arguments as ``(args, kwargs)`` with every parameter that has a name passed
    by it: passed by position, a decorated forward (transformers' output capturing, run as
    Python when Dynamo is disabled) can receive one twice (``use_cache``)."""
    args, kwargs = [], {}
    for name, value in bound.arguments.items():
        kind = bound.signature.parameters[name].kind
        if kind is inspect.Parameter.POSITIONAL_ONLY:
            args.append(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            args.extend(value)
        elif kind is inspect.Parameter.VAR_KEYWORD:
            kwargs.update(value)
        else:
            kwargs[name] = value
    return tuple(args), kwargs


def _reset_output_capturing() -> None:
    """transformers' output capturing keeps a module-level "compiling" flag while a compiled
    graph runs its decorated forwards. A compiled decoder with FlexAttention leaves it set
    (torch 2.13, transformers 5.24), and the next eager forward (the vision tower of the next
    prompt) then records no hidden states. Clear it, as its own reset would have."""
    collector = getattr(_output_capturing, "_active_collector", None)
    if getattr(collector, "compiling", False):
        collector.reset(None)


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


def _attn_implementations(model: nn.Module) -> dict | str:
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


def _attention_spec(layer: nn.Module, window: int | None, shards: int) -> LayerSpec:
    """The cache of a decoder layer's self-attention, from its module (layers of one model may
    differ, e.g. Gemma 4's global layers): KV heads and head dim, or an MLA layer's latent. The
    heads are this rank's of the ``shards`` its heads are split over by tensor parallelism (the
    config and ``out_features`` count all ranks')."""
    attn = self_attention(layer)
    cfg = attn.config
    q_heads = cfg.num_attention_heads
    if compat.caches_latent(attn):
        return LayerSpec(
            1, attn.kv_lora_rank, window, value_dim=attn.qk_rope_head_dim, latent=True,
            q_heads=q_heads,
        )  # fmt: skip
    if getattr(attn, "kv_lora_rank", None) is not None:  # MLA caching per-head K/V
        return LayerSpec(
            q_heads, attn.qk_head_dim, window, value_dim=attn.v_head_dim, q_heads=q_heads
        )
    head_dim = getattr(attn, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    k_proj = getattr(attn, "k_proj", None)
    if isinstance(k_proj, nn.Linear):
        kv_heads = k_proj.out_features // head_dim
    else:
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    return LayerSpec(kv_heads // shards, head_dim, window, q_heads=q_heads // shards)


def compile(model: nn.Module, policy: Policy | None = None, **options) -> nn.Module:
    """Make ``model`` prune its KV cache with ``policy`` (default ``CSP()``) and compile it.

    Options: ``kernel`` ("auto" | "sdpa" | "flex"), ``decode_capacity`` (cache room for new
    tokens when not generating through ``generate``), ``compile`` (False = eager, for
    debugging), ``dynamic`` (symbolic prompt lengths, default True), ``decode_softmax_n``
    (None = ordinary softmax at decode; n > 0 = the n-softmax over the pruned cache, through a
    null KV slot whose logit is pinned to ln n: an ablation, off by default),
    ``max_cache_tokens`` (None = unbounded, the default; N = the cache holds at most N tokens
    per row: when generation fills it, the policy prunes the held tokens again, scoring them
    with the queries of the last tokens, as it prunes a prompt of N tokens). Returns the same
    model, changed in place; :func:`restore` undoes it. The backend is ``model.csp_backend``.
    """
    if getattr(model, "csp_backend", None) is not None:
        raise ValueError("this model is already compiled by csp_inductor; restore(model) first")
    backend = Backend(model, CSP() if policy is None else policy, **options)
    backend.install()
    return model


def restore(model: nn.Module) -> nn.Module:
    """Undo :func:`compile`: the original attention, no hooks, no compiled decoder."""
    backend = getattr(model, "csp_backend", None)
    if backend is None:
        raise ValueError("this model was not compiled by csp_inductor")
    backend.uninstall()
    return model
