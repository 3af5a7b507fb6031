"""NVIDIA kvpress, both ways: CSP as a kvpress press, and kvpress's scorers in the backend.

``CSPPress`` is a kvpress ``ScorerPress`` that ranks with CSP's decomposed self/cross scores,
so kvpress's context manager, pipeline and evaluation run CSP::

    with CSPPress(compression_ratio=0.8)(model):
        model.generate(**inputs)

``FromKVPress`` is a csp_inductor policy that ranks with a kvpress scorer's scores, so any
``ScorerPress`` gets the backend's compaction, static cache, compiled decode and VLM families::

    model = csp_inductor.compile(model, FromKVPress(SnapKVPress(), budget=0.2))

kvpress 0.5 needs transformers < 5.3 (``make test-compat`` sets up such an environment).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

try:
    from kvpress import (
        KeyDiffPress,
        KnormPress,
        ObservedAttentionPress,
        PyramidKVPress,
        RandomPress,
        ScorerPress,
        SnapKVPress,
        StreamingLLMPress,
    )
    from kvpress.utils import compute_n_kept
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "csp_inductor.integrations.kvpress needs NVIDIA kvpress (pip install kvpress; kvpress "
        "0.5 needs transformers < 5.3)"
    ) from error
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..allocation import pyramid_weights
from ..backend.install import attn_implementations
from ..budget import Budget, split_count
from ..model_layout import detect, modality, self_attention
from ..policies import CSP, Prompt, ScoredPolicy
from ..policies.base import _check_range, _real
from ..scoring import decomposed_scores

# kvpress presses whose scores read keys and values only: the ones that stay right on models
# with multi-axis rotary positions (M-RoPE), whose queries the others rebuild with 1-D RoPE
KEY_VALUE_PRESSES = (KnormPress, RandomPress, StreamingLLMPress, KeyDiffPress)


@dataclass(frozen=True)
class _CountedCSP(CSP):
    """CSP keeping kvpress's count, ``max(1, int(L * (1 - compression_ratio)))`` tokens of an
    ``L``-token prompt, split as :func:`~csp_inductor.budget.split_count` does."""

    compression_ratio: float = 0.8

    def budget_for(self, length: int) -> Budget:
        kept = compute_n_kept(length, self.compression_ratio)
        return split_count(length, kept, self.window_ratio, self.cross_ratio)


@dataclass
class CSPPress(ScorerPress):
    """Cross-Self Pruning as a kvpress press.

    Args:
        compression_ratio: the pruned fraction of the prompt, in (0, 1) (kvpress keeps
            ``max(1, int(L * (1 - compression_ratio)))`` of ``L`` tokens per layer and head).
        window_ratio: the scoring window, the last ``int(L * window_ratio)`` prompt tokens,
            always kept; in (0, 1 - compression_ratio].
        cross_ratio: the share of the other kept tokens chosen by the cross-modality score.
        n: the n-softmax parameter used for ranking (0 = ordinary softmax).

    The modality of each prompt position comes from the model's placeholder ids (as
    :func:`csp_inductor.compile` finds them), the window queries from the model's own
    attention (post-RoPE, M-RoPE included, with the model's logit scale). The kept tokens are
    those :class:`~csp_inductor.CSP` keeps for the same count; they score in (1, 2], the others
    0. Prompts must not be padded (kvpress prunes every row to one count).
    """

    compression_ratio: float = 0.8
    window_ratio: float = 0.1
    cross_ratio: float = 0.5
    n: float = 1.0
    _is_image: Tensor | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_range("compression_ratio", self.compression_ratio, 0.0, 1.0, lo_open=True)
        if self.compression_ratio == 1:
            raise ValueError("compression_ratio must be below 1, got compression_ratio=1")
        keep = round(1 - self.compression_ratio, 12)
        _check_range("window_ratio", self.window_ratio, 0.0, keep, lo_open=True)
        _check_range("cross_ratio", self.cross_ratio, 0.0, 1.0)
        if not (_real(self.n) and self.n >= 0):
            raise ValueError(f"n must be a finite number >= 0, got n={self.n!r}")

    @property
    def policy(self) -> _CountedCSP:
        """The CSP policy this press selects with (kvpress's kept count)."""
        return _CountedCSP(
            budget=round(1 - self.compression_ratio, 12), window_ratio=self.window_ratio,
            cross_ratio=self.cross_ratio, n=self.n, compression_ratio=self.compression_ratio,
        )  # fmt: skip

    def score(self, module, hidden_states, keys, values, attentions, kwargs) -> Tensor:
        batch, heads, length, _ = keys.shape
        window, scale = module.__dict__.pop("csp_window", (None, None))
        is_image = self._is_image
        if window is None or is_image is None:
            raise RuntimeError(
                "CSPPress scores inside its own context manager (with press(model): ...), "
                "which captures the window queries and the prompt's modality"
            )
        if tuple(is_image.shape) != (batch, length):
            raise RuntimeError(
                f"CSPPress saw input_ids of shape {tuple(is_image.shape)} for a prompt of "
                f"{length} keys in layer {module.layer_idx}"
            )
        policy = self.policy
        if policy.budget_for(length).keep_all:  # no scoring query: kvpress keeps the latest
            kept = compute_n_kept(length, self.compression_ratio)
            idx = torch.arange(length - kept, length, device=keys.device)
            idx = idx.expand(batch, heads, -1)
        else:
            q = keys.new_zeros(()).expand(batch, window.shape[1], length, keys.shape[-1])
            scores = decomposed_scores(window, keys, is_image, n=self.n, scale=scale)
            idx = policy.select(q, keys, is_image, scale=scale, window_scores=scores)
        # distinct, in (1, 2]: kvpress's top-k lists the kept tokens in their prompt order
        ranks = 2 - idx.float() / length
        out = torch.zeros(batch, heads, length, device=keys.device, dtype=torch.float32)
        return out.scatter_(2, idx, ranks)

    def _capture(self, module, query, key, value, attention_mask, scaling=None, **kwargs):
        """The attention function while the press is active: keeps a prefill's window
        queries, then attends as the model's own implementation."""
        forward = module.csp_press_forward
        length = key.shape[2]
        if query.shape[2] == length:  # a prefill (a decode step's keys include the cache)
            width = self.policy.budget_for(length).window
            scale = scaling if scaling is not None else query.shape[-1] ** -0.5
            module.csp_window = (query[:, :, length - width :].clone(), scale)
        return forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)

    def _modality(self, layout, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        if isinstance(mask, Tensor) and mask.dim() == 2 and not bool(mask.all()):
            raise ValueError(
                "CSPPress cannot prune padded prompts: kvpress keeps one count for every row; "
                "send rows of equal length (or one at a time)"
            )
        is_image = modality(layout, ids, kwargs.get("mm_token_type_ids"))
        if is_image is None:
            if layout.multimodal:
                raise ValueError(
                    "CSPPress needs input_ids (or mm_token_type_ids) to know which prompt "
                    "tokens are visual; got inputs_embeds only"
                )
            embeds = kwargs["inputs_embeds"]
            is_image = torch.zeros(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
        self._is_image = is_image

    @contextlib.contextmanager
    def __call__(self, model: nn.Module) -> Iterator[None]:
        if hasattr(model, "csp_backend"):
            raise TypeError(
                "CSPPress prunes a plain transformers model; this one runs csp_inductor's backend "
                "already (csp_inductor.restore(model) first, or use its CSP policy)"
            )
        layout = detect(model, "")
        previous = attn_implementations(model)
        own = layout.decoder.config._attn_implementation or "eager"
        if own.startswith("csp_press_"):
            raise RuntimeError("CSPPress contexts do not nest: this model is under one already")
        name = f"csp_press_{own}"
        AttentionInterface.register(name, _capture)
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[own])
        target = layout.attn_target
        target = {k: name for k in target} if isinstance(target, dict) else name
        undo, hook = [], None
        try:
            for layer, kind in zip(layout.decoder.layers, layout.layer_types, strict=True):
                attn = self_attention(layer)
                if kind != "attention" or attn is None:
                    continue
                if own == "eager":
                    forward = sys.modules[type(attn).__module__].eager_attention_forward
                else:
                    forward = ALL_ATTENTION_FUNCTIONS[own]
                attn.csp_press, attn.csp_press_forward = self, forward
                undo.append(attn)
            inputs_of = getattr(model, "model", model)
            hook = inputs_of.register_forward_pre_hook(
                lambda module, args, kwargs: self._modality(layout, module, args, kwargs),
                with_kwargs=True,
            )
            model.set_attn_implementation(target)
            with super().__call__(model):
                yield
        finally:
            model.set_attn_implementation(previous)
            if hook is not None:
                hook.remove()
            for attn in undo:
                for attr in ("csp_press", "csp_press_forward", "csp_window"):
                    attn.__dict__.pop(attr, None)
            self._is_image = None


def _capture(module, query, key, value, attention_mask, scaling=None, **kwargs):
    return module.csp_press._capture(
        module, query, key, value, attention_mask, scaling=scaling, **kwargs
    )


class FromKVPress(ScoredPolicy):
    """A csp_inductor policy ranking with a kvpress ``ScorerPress``'s scores.

    The backend keeps the top ``int(L·(budget − window_ratio))`` tokens by ``press.score``
    plus the last ``int(L·window_ratio)``, the same count as every policy; the policy holds a
    copy of the press with ``compression_ratio = 1 - budget`` (some presses read it). The
    scores are computed from each attention layer's inputs, as kvpress computes them, so a
    prompt scored by a press runs the decoder eagerly; decode steps stay compiled. As with
    kvpress, the turns of a conversation are kept whole. ``layers`` shares the budget among
    the layers as for the other policies (``"uniform"`` or ``"pyramid"``); a
    ``PyramidKVPress`` is its SnapKV score with ``layers="pyramid"`` at the press's ``beta``.
    Other presses that are more than a score are refused: those that prune by their own rule
    (``compress`` overridden: per-head counts, chunks, merged or rewritten K/V) and those that
    need the attention weights; on M-RoPE models, presses that rebuild queries (all but
    :data:`KEY_VALUE_PRESSES`).
    """

    name = "kvpress"
    needs_layer_inputs = True

    press: ScorerPress

    def __init__(
        self,
        press: ScorerPress,
        budget: float = 0.2,
        window_ratio: float = 0.1,
        *,
        layers: str | None = None,
    ):
        if not isinstance(press, ScorerPress):
            raise TypeError(
                f"FromKVPress takes a kvpress ScorerPress (it ranks by press.score); got "
                f"press={type(press).__name__}, which is not one"
            )
        if isinstance(press, ObservedAttentionPress):
            raise TypeError(
                "FromKVPress cannot use ObservedAttentionPress: it scores with the prompt's "
                "full attention matrix, which the backend never forms (use H2O)"
            )
        pyramid = isinstance(press, PyramidKVPress)
        if type(press).compress is not ScorerPress.compress and not pyramid:
            raise TypeError(
                f"FromKVPress cannot use {type(press).__name__}: it overrides compress (its "
                "own counts or K/V rewriting), which is more than a score the backend can rank "
                "by"
            )
        layers = layers or ("pyramid" if pyramid else "uniform")
        if pyramid and layers != "pyramid":
            raise ValueError(f"a PyramidKVPress shares its budget by the pyramid rule; {layers=}")
        for name, value in (("budget", budget), ("window_ratio", window_ratio), ("layers", layers)):
            object.__setattr__(self, name, value)
        self.__post_init__()
        press = copy.copy(press)
        press.compression_ratio = round(1 - budget, 12)
        object.__setattr__(self, "press", press)

    # a press is mutable, so the policy is itself (the backend names policies by hash)
    __eq__ = object.__eq__
    __hash__ = object.__hash__

    def __repr__(self) -> str:
        return (
            f"FromKVPress({type(self.press).__name__}, budget={self.budget}, "
            f"window_ratio={self.window_ratio}, layers={self.layers!r})"
        )

    def layer_weights(self, layers: int) -> list[float]:
        if isinstance(self.press, PyramidKVPress):
            return pyramid_weights(layers, self.press.beta)
        return super().layer_weights(layers)

    def prepare(self, model) -> None:
        text = model.config.get_text_config()
        rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None)
        multi_axis = isinstance(rope, dict) and "mrope_section" in rope
        if multi_axis and not isinstance(self.press, KEY_VALUE_PRESSES):
            raise ValueError(
                f"{type(self.press).__name__} rebuilds queries with 1-D rotary positions, but "
                f"{type(model).__name__}'s are multi-axis (M-RoPE); presses that read keys and "
                f"values only work here: {', '.join(c.__name__ for c in KEY_VALUE_PRESSES)}"
            )
        self.press.post_init_from_model(model)

    def layer_scores(self, module, inputs: dict, key: Tensor, value: Tensor) -> Tensor:
        press = type(self.press).__name__
        try:
            scores = self.press.score(module, inputs["hidden_states"], key, value, None, inputs)
        except AttributeError as error:
            if "rotary_emb" not in str(error):
                raise
            raise ValueError(
                f"{press} calls the attention layer's rotary_emb; {type(module).__name__} has "
                "none the press can call (Gemma 3's needs a layer type kvpress does not pass): "
                "use a press that reads keys and values or the layer's inputs only"
            ) from error
        want = (key.shape[0], key.shape[1], key.shape[2])
        if tuple(scores.shape) != want:
            raise ValueError(
                f"{press}.score must return (batch, kv_heads, seq) = {want}, got "
                f"shape={tuple(scores.shape)}"
            )
        return scores.float()

    def score(self, prompt: Prompt) -> Tensor:
        return prompt.scores


def compare(argv: list[str] | None = None) -> int:
    """kvpress and csp_inductor on the built-in model (VisualHaystack, one prompt at a time):
    kvpress's SnapKV and CSP as a kvpress press, under kvpress's hooks; kvpress's SnapKV
    scorer and CSP in the backend. Accuracy, KV tokens held after the prefill, seconds."""
    import argparse
    import time

    from ..evaluation import haystack as hs
    from ..evaluation.harness import _generate, pruning
    from ..policies import CSP

    p = argparse.ArgumentParser(prog="python -m csp_inductor kvpress", description=compare.__doc__)
    p.add_argument("--samples", type=int, default=4, help="held-out prompts per task")
    p.add_argument("--budget", type=float, default=0.2, help="kept fraction of each prompt")
    p.add_argument(
        "--window-ratio", type=float, default=0.1,
        help="the always-kept recent fraction of CSP, CSPPress and FromKVPress",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=7)
    args = p.parse_args(argv)
    logging.getLogger("kvpress").setLevel(logging.ERROR)  # "model not tested" per press use
    model = hs.load_builtin_model()
    data = hs.make_split("test", args.samples * len(hs.TASKS), seed=args.seed)
    ratio = round(1 - args.budget, 12)
    snap = {"window_size": 16}  # the built-in prompts are 100-600 tokens
    window = args.window_ratio
    rows = [
        ("kvpress", "SnapKVPress", SnapKVPress(ratio, **snap)),
        ("kvpress", "CSPPress", CSPPress(ratio, window_ratio=window)),
        (
            "csp_inductor", "FromKVPress(SnapKVPress)",
            FromKVPress(SnapKVPress(**snap), args.budget, window_ratio=window),
        ),
        ("csp_inductor", "CSP", CSP(args.budget, window_ratio=window)),
    ]  # fmt: skip
    print(
        f"built-in tiny LLaVA, {len(data)} VisualHaystack prompts, budget {args.budget:.0%} "
        f"(window {window:.0%}; kvpress SnapKV: 16 tokens), one prompt at a time, eager"
    )
    header = f"{'library':<14}{'method':<26}{'accuracy':>9}{'prompt KV kept':>16}{'seconds':>9}"
    print(header, "-" * len(header), sep="\n")
    for library, method, how in rows:
        correct = held = 0
        start = time.perf_counter()
        for sample in data:
            batch = hs.collate([sample])
            if library == "kvpress":
                cache = DynamicCache()
                with how(model):
                    new = _generate(model, {**batch, "past_key_values": cache}, max_new_tokens=4)
                held += int(cache.get_seq_length()) - (new.shape[1] - 1)  # before decoding
            else:
                with pruning(model, how) as backend:
                    new = _generate(model, batch, max_new_tokens=4)
                    held += int(backend.cache.lengths[0]) - (new.shape[1] - 1)
            correct += hs.score(new[0], sample)
        seconds = time.perf_counter() - start
        print(
            f"{library:<14}{method:<26}{correct / len(data):>9.1%}"
            f"{held / sum(len(s.input_ids) for s in data):>16.1%}{seconds:>9.1f}"
        )
    return 0
