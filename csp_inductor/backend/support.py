"""Which policies a backend can run on its model: :func:`why_unsupported`."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..cache_layer import LayerSpec
    from ..model_layout import ModelLayout
    from ..policies import Policy


def why_unsupported(
    policy: Policy,
    model_name: str,
    layout: ModelLayout,
    specs: list[LayerSpec],
    bound: int | None,
    chunk: int | None = None,
) -> str | None:
    """Why ``policy`` cannot prune the cache of this model (``model_name``, its ``layout`` and
    cache ``specs``) under ``bound`` (``max_cache_tokens``) with prompts streamed ``chunk``
    tokens at a time (``prefill_chunk``), or None when it can."""
    latent = any(spec.latent for spec in specs)
    return (
        _why_not_bounded(policy, model_name, latent, bound)
        or _why_not_reread(policy, model_name, layout, latent, bound)
        or _why_not_layer_inputs(policy, model_name, latent, bound)
        or _why_not_streamed(policy, model_name, layout, bound, chunk)
        or _why_not_by_layer(policy, bound, chunk)
    )


def _why_not_by_layer(policy: Policy, bound: int | None, chunk: int | None) -> str | None:
    """Layers of their own counts hold a prompt pruned once, at its prefill: not a bounded
    cache's re-prunes nor a streamed prompt's."""
    if policy.layer_rule == "uniform" or (bound is None and chunk is None):
        return None
    option = "max_cache_tokens" if bound is not None else "prefill_chunk"
    return (
        f"layers={policy.layer_rule!r} is not supported with {option}: re-pruning a cache "
        "keeps the same count in every layer; use layers='uniform'"
    )


def _why_not_bounded(policy: Policy, model_name: str, latent: bool, bound: int | None):
    """A bounded cache needs a policy that frees room in a full cache and scores it with the
    recent queries it keeps (or with none)."""
    if bound is None:
        return None
    if policy.budget_for(bound).keep_all:
        return (
            f"max_cache_tokens={bound} needs a policy that prunes a cache of {bound} tokens; "
            f"{policy!r} keeps them all"
        )
    if policy.scores_every_query:
        return (
            f"max_cache_tokens needs a policy that scores with the recent queries (CSP, "
            f"SnapKV) or none (StreamingLLM, KNorm, RandomKeep); {policy!r} scores with "
            "every query, which a cache does not keep"
        )
    if latent:
        return (
            f"max_cache_tokens is not supported for {model_name}: its multi-head latent "
            "attention caches a latent the re-prune cannot score"
        )
    return None


def _why_not_reread(policy, model_name, layout: ModelLayout, latent: bool, bound: int | None):
    """A question-agnostic policy re-reads the prompt through the decoder: not on models whose
    layers share K/V or store a latent, not under a bound."""
    if policy.reconstruction is None:
        return None
    why = None
    if layout.kv_source:
        why = "its layers share K/V and compute only the last queries of a later input"
    elif layout.recurrent:
        why = "its recurrent layers would read the prompt into their state a second time"
    elif latent:
        why = "its multi-head latent attention caches a latent the re-read cannot score"
    elif bound is not None:
        why = "max_cache_tokens re-prunes with the recent queries; use a window policy"
    if why is None:
        return None
    return (
        f"{policy!r} scores the prompt by re-reading it, which is not supported for "
        f"{model_name}: {why}"
    )


def _why_not_layer_inputs(policy: Policy, model_name: str, latent: bool, bound: int | None):
    """A policy that ranks by the layers' inputs scores prompts only (it keeps turns whole):
    not the held tokens of a bounded cache, nor a latent."""
    if not policy.needs_layer_inputs:
        return None
    why = None
    if bound is not None:
        why = "max_cache_tokens re-prunes held tokens, whose layer inputs are gone"
    elif latent:
        why = "its multi-head latent attention caches a latent, not the keys it would score"
    if why is None:
        return None
    return (
        f"{policy!r} ranks by each layer's inputs, which is not supported for {model_name}: {why}"
    )


def _why_not_streamed(policy, model_name, layout: ModelLayout, bound: int | None, chunk):
    """A streamed prompt's chunks after the first are turns: a model must continue a cache,
    a policy prune a turn, and under a bound a re-prune must leave room for a chunk."""
    if chunk is None:
        return None
    if layout.kv_source:
        return (
            f"prefill_chunk is not supported for {model_name}: its layers share K/V and compute "
            "only the last queries of a later chunk"
        )
    if policy.needs_layer_inputs:
        return (
            f"prefill_chunk needs a policy that prunes each chunk as it arrives; {policy!r} "
            "ranks by the layers' inputs, which it collects for a whole prompt only"
        )
    if bound is not None:
        after = policy.budget_for(bound).kept
        if after + chunk > bound:
            return (
                f"prefill_chunk={chunk} does not fit under max_cache_tokens={bound} beside the "
                f"{after} tokens {policy!r} keeps of a full cache; lower the chunk or the "
                "budget, or raise the bound"
            )
    return None
