"""The backend of one compiled model: :class:`Backend`, what its stages share."""

from __future__ import annotations

import functools
import inspect
from typing import TYPE_CHECKING

import torch
from torch import nn

from .. import compat
from ..attention import FLEX_BLOCK, choose_kernel
from ..cache import PrunedCache
from ..cache_layer import LayerSpec
from ..compiled import Compiled
from ..distributed import check_layout
from ..model_layout import detect, self_attention
from ..policies import Full, Policy
from ..policy_table import PolicySlot, register_policy
from . import adaptive, bound, install, reread
from .compiled_forward import CompiledForward
from .lm_head import CompiledHead
from .specs import layer_specs
from .step import Step
from .support import why_unsupported

if TYPE_CHECKING:
    from ..compile import Options


class Backend:
    """A compiled model's backend (``model.csp_backend``): its layout, policy and options, the
    cache of its last forward, and its compiled functions. The stages that use them are the
    modules of this package, in the order a forward meets them: :mod:`.dispatch` (what a forward
    is: its :class:`~.step.Step`), :mod:`.prompt`, :mod:`.turn` and :mod:`.room` (planning a
    prompt, a turn, decode steps), :mod:`.reread` and :mod:`.bound` (pruning after the
    forward); :mod:`.install` puts them on the model."""

    def __init__(self, model: nn.Module, policy: Policy, options: Options):
        self.model, self.options = model, options
        self.layout = detect(model, install.ATTN_NAME)
        self.decoder = self.layout.decoder
        # over how many tensor-parallel ranks each layer's heads are split (1: not split)
        self.head_shards = check_layout(model, self.attention_modules("attention", "shared"))
        # the policy indices the compiled graph reads: the policy's (assignable) and keeping
        # everything (a prompt before its re-read, a turn of a policy scoring prompts only)
        self.policy_slot = PolicySlot(self)
        self.policy_index = self.policy_slot.index
        self.full_index = torch.tensor(register_policy(Full()))
        self.policy = policy
        self.kernel = choose_kernel(options.kernel, next(self.decoder.parameters()).device)
        # positional forward arguments are named once, not per decode step
        self.forward_params = list(inspect.signature(model.forward).parameters)
        self.cache_arg = compat.forward_cache_arg(model.forward)
        self.decoder_cache_arg = compat.forward_cache_arg(self.decoder.forward)
        self.compiled: CompiledForward | None = None  # the compiled decoder forward
        self.lm_head: CompiledHead | None = None  # the compiled LM head of decode steps
        self.reprune_layers = bound.reprune_layers
        if options.compile:
            self.reprune_layers = Compiled(bound.reprune_layers, "the bounded cache's re-prune")
        self.step: Step | None = None  # the running forward's
        self.generating: install.GenerateCall | None = None  # the running generate call
        # flex masks of decode steps by (new tokens per step, layer or None for global layers)
        self.block_masks: dict[tuple[int, int | None], object] = {}
        self.cache = self.new_cache()  # the cache of the last forward that had one
        self._undo = None

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
        model_name, options = type(self.model).__name__, self.options
        why = why_unsupported(
            policy, model_name, self.layout, self.layer_specs(), options.max_cache_tokens,
            options.prefill_chunk,
        )  # fmt: skip
        if why is not None:
            raise ValueError(why)
        self.policy_slot.set(policy)
        self._policy = policy

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
        return None if self.lm_head is None else self.lm_head.failure

    @property
    def layer_inputs(self) -> dict[int, dict]:
        """What the running forward collected of its layers' inputs (by layer; see
        :mod:`.layer_inputs`)."""
        return {} if self.step is None else self.step.layer_inputs

    def install(self) -> None:
        self._undo = install.install(self)

    def uninstall(self) -> None:
        self.end_step()  # (a failed forward's)
        self._undo.close()

    def new_step(self, phase: str, cache: PrunedCache | None) -> Step:
        """A forward's step, keeping by the policy unless its planning says otherwise."""
        return Step(
            phase, cache, self.layout, self.kernel, self.options.null_logit, keep=self.policy_index
        )

    def end_step(self) -> Step | None:
        """End the running forward's step (undo what it set up); it is returned."""
        step, self.step = self.step, None
        if step is not None:
            step.undo.close()
        return step

    def finish_step(self, tokens: int) -> Step | None:
        """End the running forward's step after its ``tokens`` tokens: the cache moves past
        them, and a prompt to re-read is re-read."""
        step = self.end_step()
        if step is not None and step.cache is not None:
            step.cache.advance(tokens)
            if step.layer_scores:  # an adaptive policy's prompt: its layers' counts
                adaptive.trim(self, step)
            if step.rereads:
                reread.reread(self, step)
        return step

    def layer_specs(self) -> list[LayerSpec]:
        return layer_specs(self.layout, self.head_shards)

    @functools.cached_property
    def scales(self) -> tuple[float, ...]:
        """The logit scale of each layer the cache stores K/V for (its module's ``scaling``)."""
        return tuple(
            float(getattr(attn, "scaling", None) or attn.head_dim**-0.5)
            for attn in self.attention_modules("attention").values()
        )

    def attention_modules(self, *kinds: str) -> dict[int, nn.Module]:
        """The self-attention modules of the decoder's layers of these kinds, by layer."""
        layers = enumerate(zip(self.decoder.layers, self.layout.layer_types, strict=True))
        return {i: self_attention(layer) for i, (layer, kind) in layers if kind in kinds}

    def new_cache(self, decode_capacity: int | None = None) -> PrunedCache:
        """An empty cache for one prompt (batch) with room for ``decode_capacity`` new tokens."""
        # Compiled flex on CPU (torch 2.13) returns wrong results when the KV length is below
        # one block and differs from the query length: flex buffers are whole blocks.
        align = FLEX_BLOCK if self.kernel == "flex" else 1
        limit, window = self.options.max_cache_tokens, 0
        if limit is not None and self.policy.window_n is not None:
            window = self.policy.budget_for(limit).window  # the scoring window of a full cache
        return PrunedCache(
            self.layer_specs(), decode_capacity or self.decode_capacity, align,
            null_slot=self.options.null_logit is not None, bound=limit, window=window,
        )  # fmt: skip

    @property
    def decode_capacity(self) -> int:
        """Cache room for new tokens when not generating through ``generate``."""
        return self.options.decode_capacity

    @property
    def compile(self) -> bool:
        """Whether the decoder is compiled (``compile=False``: eager)."""
        return self.options.compile
