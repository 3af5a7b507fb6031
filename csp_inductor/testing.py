"""Helpers shared by the tests and the benchmarks: random prompts, the reference selection of
every policy, the authors' ``softmax_n`` and the authors' dense scoring."""

from __future__ import annotations

import importlib.util
import inspect
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from . import reference
from .budget import Budget
from .compat import BEFORE_5_3
from .model_layout import PLACEHOLDER_ATTRS
from .policies import CSP, H2O, KNorm, LookM, Policy, RandomKeep, SnapKV, StreamingLLM


@dataclass
class RandomPrompt:
    """One layer's worth of random prompt tensors (see :func:`random_prompt`)."""

    q: Tensor  # (batch, q_heads, seq, head_dim)
    k: Tensor  # (batch, kv_heads, seq, head_dim)
    is_image: Tensor  # (batch, seq) bool
    key_padding: Tensor | None  # (batch, seq) bool, left padding


LAYOUTS = ("mixed", "text", "image", "blocks")


def random_prompt(
    batch: int = 1,
    q_heads: int = 4,
    kv_heads: int = 2,
    seq: int = 64,
    head_dim: int = 16,
    *,
    pads: list[int] | None = None,
    layout: str = "blocks",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> RandomPrompt:
    """Random queries/keys with a modality layout:

    ``"text"`` / ``"image"``: one modality only; ``"mixed"``: each token independently;
    ``"blocks"``: runs of image tokens between text, as interleaved multi-image prompts have.
    ``pads[b]`` left-padding positions in row ``b`` (None = no padding).
    """
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_heads, seq, head_dim, generator=gen, dtype=torch.float64)
    k = torch.randn(batch, kv_heads, seq, head_dim, generator=gen, dtype=torch.float64)
    # a few strongly attended keys so scores are spread out, as in real attention
    k[:, :, torch.randint(seq, (max(1, seq // 8),), generator=gen)] *= 3
    if layout == "text":
        is_image = torch.zeros(batch, seq, dtype=torch.bool)
    elif layout == "image":
        is_image = torch.ones(batch, seq, dtype=torch.bool)
    elif layout == "mixed":
        is_image = torch.rand(batch, seq, generator=gen) < 0.5
    elif layout == "blocks":
        period = max(2, seq // 5)
        is_image = ((torch.arange(seq) % period) < period * 2 // 3).expand(batch, seq).clone()
    else:
        raise ValueError(f"layout must be one of {LAYOUTS}, got layout={layout!r}")
    key_padding = None
    if pads is not None:
        key_padding = torch.arange(seq)[None, :] < torch.tensor(pads)[:, None]
    dev = torch.device(device)
    return RandomPrompt(
        q.to(dtype).to(dev),
        k.to(dtype).to(dev),
        is_image.to(dev),
        None if key_padding is None else key_padding.to(dev),
    )


def reference_select(
    policy: Policy,
    q: Tensor,
    k: Tensor,
    is_image: Tensor,
    key_padding: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """``policy.select`` computed the slow way: each sequence on its own, unpadded, with dense
    fp64 scores and Python ranking (:mod:`csp_inductor.reference`), shifted back by its padding."""
    batch, _, seq, head_dim = q.shape
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    rows = []
    for b in range(batch):
        pad = 0 if key_padding is None else int(key_padding[b].sum())
        qb, kb = q[b : b + 1, :, pad:].double(), k[b : b + 1, :, pad:].double()
        img = is_image[b : b + 1, pad:]
        budget = policy.budget_for(seq - pad)
        per_head = _reference_rows(policy, qb, kb, img, budget, scale)
        rows.append([[j + pad for j in r] for r in per_head])
    return reference.pad_rows(rows)


def _reference_rows(policy, q, k, img, budget: Budget, scale: float) -> list[list[int]]:
    heads, length = k.shape[1], k.shape[2]
    if budget.keep_all:
        return [list(range(length))] * heads
    window = q[:, :, length - budget.window :]
    if isinstance(policy, CSP):
        scores = reference.decomposed_scores(window, k, img, n=policy.n, scale=scale)[0]
        if not policy.faithful and not bool(img.any()):
            budget = replace(budget, k_self=budget.k_self + budget.k_cross, k_cross=0)
        return [
            reference.csp_keep(
                s[0].tolist(), s[1].tolist(), budget, 0,
                sink_tokens=policy.sink_tokens, faithful=policy.faithful,
            )
            for s in scores
        ]  # fmt: skip
    first = None
    if isinstance(policy, StreamingLLM):
        score = torch.arange(length, 0, -1).double().expand(heads, -1)
    elif isinstance(policy, H2O):  # LookM included
        score = reference.column_softmax_sums(q, k, scale=scale)[0]
        if isinstance(policy, LookM):
            first = (~img[0]).tolist()
    elif isinstance(policy, SnapKV):
        sums = reference.column_softmax_sums(window, k, scale=scale)
        score = reference.snapkv_pool(sums, budget.window, policy.kernel_size)[0]
    elif isinstance(policy, KNorm):
        score = -k[0].norm(dim=-1)
    elif isinstance(policy, RandomKeep):
        return _random_rows(policy, heads, length, budget)
    else:
        raise TypeError(f"no reference for policy {type(policy).__name__}")
    return [reference.ranked_keep(s.tolist(), budget, 0, first=first) for s in score]


def _random_rows(policy: RandomKeep, heads: int, length: int, budget: Budget) -> list[list[int]]:
    # The random scores are drawn for the padded batch; the reference draws them the same way
    # for a batch of one, so only compare RandomKeep on unpadded batches of one.
    score = torch.rand(1, heads, length, generator=torch.Generator().manual_seed(policy.seed))[0]
    return [reference.ranked_keep(s.tolist(), budget, 0) for s in score]


def authors_softmax_n():
    """``softmax_n`` from ``flash-attention-softmax-n``, the package the CSP authors used.

    Its package ``__init__`` imports a CUDA-only Triton module when Triton is installed, so the
    pure-torch function is loaded from its own file.
    """
    spec = importlib.util.find_spec("flash_attention_softmax_n")
    if spec is None or spec.origin is None:
        raise ImportError("flash-attention-softmax-n is not installed (pip install .[test])")
    path = Path(spec.origin).parent / "core" / "functional.py"
    module_spec = importlib.util.spec_from_file_location("_softmax_n_functional", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.softmax_n


def authors_dense_scores(
    q: Tensor, k: Tensor, is_image: Tensor, window: int, n: float = 1.0
) -> Tensor:
    """The authors' approach, for benchmarks: the full (batch, heads, seq, seq) causal logits of
    every prompt query, an fp32 n-softmax copy of them, then masked sums over the window rows.
    Returns (batch, kv_heads, 2, seq) like :func:`csp_inductor.decomposed_scores`."""
    b, hq, seq, d = q.shape
    hkv = k.shape[1]
    keys = k.repeat_interleave(hq // hkv, dim=1)
    logits = (q @ keys.transpose(-1, -2)) / math.sqrt(d)
    causal = torch.ones(seq, seq, dtype=torch.bool, device=q.device).tril()
    logits = logits.masked_fill(~causal, -math.inf)
    probs = reference.n_softmax(logits.float(), n=n)[:, :, seq - window :]
    q_img = is_image[:, None, seq - window :, None].float()
    c_img = (probs * q_img).sum(2).view(b, hkv, -1, seq).sum(2)
    c_txt = (probs * (1 - q_img)).sum(2).view(b, hkv, -1, seq).sum(2)
    key_img = is_image[:, None]
    return torch.stack(
        [torch.where(key_img, c_img, c_txt), torch.where(key_img, c_txt, c_img)], dim=2
    )


# --- greedy generation, compared -------------------------------------------------------------
def greedy(model, inputs: dict, new_tokens: int, **options) -> tuple[Tensor, Tensor]:
    """Greedy ``generate`` (``options``: more of its arguments): the new tokens (batch,
    new_tokens) and their logits (batch, new_tokens, vocab)."""
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=new_tokens, do_sample=False, output_logits=True,
            return_dict_in_generate=True, **options,
        )  # fmt: skip
    return out.sequences[:, inputs["input_ids"].shape[1] :], torch.stack(out.logits, dim=1)


def assert_same_generation(got: tuple[Tensor, Tensor], want: tuple[Tensor, Tensor]) -> None:
    """Same tokens and logits within 1e-4 (a masking error shows even if no token flips)."""
    torch.testing.assert_close(got[1], want[1], atol=1e-4, rtol=1e-4)
    assert got[0].tolist() == want[0].tolist()


# --- tiny models of every supported family ---------------------------------------------------
FAMILIES = (
    "llava",
    "llava_next",
    "qwen2_vl",
    "qwen2_5_vl",
    "idefics3",
    "smolvlm",
    "gemma3",
    "llama",
    "qwen2",
)
TEXT_ONLY = ("llama", "qwen2")
TINY_VOCAB = 128
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
IMAGE_ID, VIDEO_ID, VISION_START_ID, VISION_END_ID = 100, 101, 102, 103
TEXT_IDS = (3, 90)  # prompt text tokens are drawn from this range


def _text_kwargs(**overrides) -> dict:
    kwargs = dict(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
    )  # fmt: skip
    kwargs.update(overrides)
    return kwargs


def _tiny_config(family: str):
    import transformers as tf

    if family == "llama":
        return tf.LlamaConfig(**_text_kwargs())
    if family == "qwen2":
        return tf.Qwen2Config(**_text_kwargs())
    if family in ("llava", "llava_next"):
        vision = tf.CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            image_size=32, patch_size=8, projection_dim=32,
        )  # fmt: skip
        common = dict(
            vision_config=vision, text_config=tf.LlamaConfig(**_text_kwargs()),
            image_token_index=IMAGE_ID, vision_feature_select_strategy="default",
            vision_feature_layer=-1,
        )  # fmt: skip
        if family == "llava":
            return tf.LlavaConfig(**common)
        # one image shape, 32x64: a base tile and a 1x2 grid of tiles
        return tf.LlavaNextConfig(**common, image_grid_pinpoints=[[32, 64], [64, 32]])
    if family in ("qwen2_vl", "qwen2_5_vl"):
        rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
        text = _text_kwargs(rope_parameters=rope)
        vision = dict(
            depth=1, hidden_size=32, num_heads=2, patch_size=4, spatial_merge_size=2,
            temporal_patch_size=2,
        )  # fmt: skip
        if family == "qwen2_vl":
            vision.update(embed_dim=32, hidden_size=64, mlp_ratio=2)
            config_class = tf.Qwen2VLConfig
        else:
            vision.update(
                intermediate_size=64, out_hidden_size=64, window_size=16, fullatt_block_indexes=[0]
            )
            config_class = tf.Qwen2_5_VLConfig
        return config_class(
            text_config=text, vision_config=vision, image_token_id=IMAGE_ID,
            video_token_id=VIDEO_ID, vision_start_token_id=VISION_START_ID,
            vision_end_token_id=VISION_END_ID,
        )  # fmt: skip
    if family in ("idefics3", "smolvlm"):
        config_class = tf.Idefics3Config if family == "idefics3" else tf.SmolVLMConfig
        vision = dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            image_size=64, patch_size=8,
        )  # fmt: skip
        return config_class(
            vision_config=vision, text_config=tf.LlamaConfig(**_text_kwargs()).to_dict(),
            image_token_id=IMAGE_ID, scale_factor=2, pad_token_id=PAD_ID,
        )  # fmt: skip
    if family == "gemma3":
        # two sliding-window layers (window 24, shorter than the prompts) and a global one
        text = tf.Gemma3TextConfig(
            **_text_kwargs(num_hidden_layers=3),
            head_dim=16, query_pre_attn_scalar=16, sliding_window=24,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        )  # fmt: skip
        vision = tf.SiglipVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            image_size=32, patch_size=4,
        )  # fmt: skip
        return tf.Gemma3Config(
            text_config=text, vision_config=vision, mm_tokens_per_image=16,
            image_token_index=IMAGE_ID, boi_token_index=VISION_START_ID,
            eoi_token_index=VISION_END_ID,
        )  # fmt: skip
    raise ValueError(f"family must be one of {FAMILIES}, got family={family!r}")


def tiny_model(family: str, seed: int = 0):
    """A tiny random-weight model of ``family`` (see :data:`FAMILIES`), built from a fresh
    config (so ``set_attn_implementation`` on it touches no other model): fp32, eval mode, sdpa,
    2–3 decoder layers with GQA (4 query heads, 2 KV heads), a one-layer vision tower."""
    import transformers as tf

    classes = {
        "llava": tf.LlavaForConditionalGeneration,
        "llava_next": tf.LlavaNextForConditionalGeneration,
        "qwen2_vl": tf.Qwen2VLForConditionalGeneration,
        "qwen2_5_vl": tf.Qwen2_5_VLForConditionalGeneration,
        "idefics3": tf.Idefics3ForConditionalGeneration,
        "smolvlm": tf.SmolVLMForConditionalGeneration,
        "gemma3": tf.Gemma3ForConditionalGeneration,
        "llama": tf.LlamaForCausalLM,
        "qwen2": tf.Qwen2ForCausalLM,
    }
    config = _tiny_config(family)
    torch.manual_seed(seed)
    model = classes[family](config)
    model.set_attn_implementation("sdpa")
    return model.float().eval()


def _tokens_per_image(model, family: str) -> int:
    config = model.config
    if family == "llava":
        return (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    if family == "llava_next":  # base tile + a 1x2 grid of tiles + one newline per grid row
        side = config.vision_config.image_size // config.vision_config.patch_size
        return side * side + 2 * side * side + side
    if family in ("qwen2_vl", "qwen2_5_vl"):
        return _QWEN_GRID[1] * _QWEN_GRID[2] // config.vision_config.spatial_merge_size**2
    if family in ("idefics3", "smolvlm"):
        side = config.vision_config.image_size // config.vision_config.patch_size
        return side * side // config.scale_factor**2
    if family == "gemma3":
        return config.mm_tokens_per_image
    return 0


_QWEN_GRID = (1, 8, 8)  # (t, h, w) patches of one image
_IMAGES_PER_ROW = 2
_TEXT_RUNS = (30, 24, 12)  # text before, between and after the two images


def tiny_inputs(
    model, family: str, batch: int = 1, seed: int = 0, pads: list[int] | None = None
) -> dict:
    """``generate``/forward kwargs for :func:`tiny_model`: per row text, image, text, image,
    text (~100–170 tokens; text-only families: 96 text tokens), the image placeholders and the
    pixel inputs the family needs, and ``attention_mask``. ``pads[b]`` left-padding tokens in
    row ``b`` (rows are shortened by their padding, so all have the same padded length)."""
    gen = torch.Generator().manual_seed(seed)
    pads = [0] * batch if pads is None else [int(p) for p in pads]
    if len(pads) != batch:
        raise ValueError(f"pads must have one entry per row (batch={batch}), got pads={pads}")
    text_only = family in TEXT_ONLY
    runs = (sum(_TEXT_RUNS) + 30,) if text_only else _TEXT_RUNS
    if max(pads) >= runs[0]:
        raise ValueError(f"pads must be < {runs[0]}, got pads={pads}")
    n_images = 0 if text_only else _IMAGES_PER_ROW
    per_image = _tokens_per_image(model, family)
    framed = family in ("qwen2_vl", "qwen2_5_vl", "gemma3")  # <start> image tokens <end>
    rows, types = [], []
    for pad in pads:
        ids, kinds = [PAD_ID] * pad, [0] * pad
        for i, length in enumerate(runs):
            length -= pad if i == 0 else 0
            ids += torch.randint(*TEXT_IDS, (length,), generator=gen).tolist()
            kinds += [0] * length
            if i < n_images:
                ids += (
                    [VISION_START_ID] * framed + [IMAGE_ID] * per_image + [VISION_END_ID] * framed
                )
                kinds += [0] * framed + [1] * per_image + [0] * framed
        rows.append(ids)
        types.append(kinds)
    input_ids = torch.tensor(rows)
    mask = (torch.arange(input_ids.shape[1])[None, :] >= torch.tensor(pads)[:, None]).long()
    inputs = {"input_ids": input_ids, "attention_mask": mask}
    images = batch * n_images
    if family in ("llava", "gemma3"):
        size = model.config.vision_config.image_size
        inputs["pixel_values"] = torch.randn(images, 3, size, size, generator=gen)
    elif family == "llava_next":
        size = model.config.vision_config.image_size
        inputs["pixel_values"] = torch.randn(images, 3, 3, size, size, generator=gen)
        inputs["image_sizes"] = torch.tensor([[size, 2 * size]] * images)
    elif family in ("qwen2_vl", "qwen2_5_vl"):
        vision = model.config.vision_config
        t, h, w = _QWEN_GRID
        patch = 3 * vision.temporal_patch_size * vision.patch_size**2
        inputs["pixel_values"] = torch.randn(images * t * h * w, patch, generator=gen)
        inputs["image_grid_thw"] = torch.tensor([list(_QWEN_GRID)] * images)
        if "mm_token_type_ids" in inspect.signature(model.forward).parameters:
            inputs["mm_token_type_ids"] = torch.tensor(types)  # (transformers >= 5.3)
    elif family in ("idefics3", "smolvlm"):
        size = model.config.vision_config.image_size
        shape = (batch, n_images, 3, size, size)
        inputs["pixel_values"] = torch.randn(shape, generator=gen)
        inputs["pixel_attention_mask"] = torch.ones(shape[:2] + shape[3:], dtype=torch.bool)
    if family == "gemma3":
        inputs["token_type_ids"] = torch.tensor(types)
    return inputs


# --- tiny models of any family, built from transformers' own config defaults -----------------
TINY_TEXT = dict(
    hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, global_head_dim=32, vocab_size=TINY_VOCAB + 32, max_position_embeddings=1024,
    moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=4,
    num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2, linear_num_key_heads=2,
    linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16,
    hidden_size_per_layer_input=8, vocab_size_per_layer_input=TINY_VOCAB + 32,
    sliding_window=24, kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=16, qk_nope_head_dim=16,
    v_head_dim=24, attention_chunk_size=16,
)  # fmt: skip
TINY_VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=1, depth=1, num_attention_heads=2,
    num_heads=2, embed_dim=32, out_hidden_size=64, projection_dim=32,
)  # fmt: skip
# what the defaults of a family need changed to make a tiny model: (text config, top-level)
# overrides; a top-level dict value updates that sub-config
TINY_OVERRIDES: dict[str, tuple[dict, dict]] = {
    # the defaults are all attention; checkpoints interleave short-conv layers
    "lfm2_vl": ({"layer_types": ["conv", "full_attention"], "full_attn_idxs": [1]}, {}),
    "molmo2": ({}, {"adapter_config": {"vision_feature_layer": [-1]}}),
    # the multimodal rotary sections must add up to half the (tiny) head dim
    **{
        name: ({"rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3]}}, {})
        for name in ("qwen2_vl", "qwen2_5_vl", "glm4v")
    },
    # plain rotary over the (tiny) rope part of the head, not YaRN's checkpoint scaling
    "mistral4": (
        {
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "llama_4_scaling_beta": 0.1,
                "original_max_position_embeddings": 64,
            },
        },
        {},
    ),
    # the last two layers reuse the K/V of the last sliding and the last full layer before them
    "gemma3n_text": (
        {
            "layer_types": ["sliding_attention", "full_attention"] * 2,
            "num_kv_shared_layers": 2,
            "activation_sparsity_pattern": [0.0] * 4,
        },
        {},
    ),
    "gemma4": (  # as above, and images attend to themselves bidirectionally (sliding layers)
        {
            "layer_types": ["sliding_attention", "full_attention"] * 2,
            "num_kv_shared_layers": 2,
            "use_bidirectional_attention": "vision",
        },
        {},
    ),
}
TINY_PLACEHOLDERS = {"image": IMAGE_ID, "video": VIDEO_ID, "audio": VIDEO_ID + 4}


def _shrunk(config_dict: dict, values: dict) -> dict:
    return {k: (values[k] if k in values and v is not None else v) for k, v in config_dict.items()}


def known_model_types(*model_types: str) -> list[str]:
    """Those of ``model_types`` the installed transformers has (families come and go)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return [model_type for model_type in model_types if model_type in CONFIG_MAPPING_NAMES]


def tiny_family_config(model_type: str):
    """A tiny config of ``model_type`` from transformers' defaults: 2 decoder layers (one per
    layer type, in the order the defaults first use them), 64 hidden, GQA 4/2 heads, a
    160-token vocabulary with the placeholders at :data:`IMAGE_ID`/:data:`VIDEO_ID`, and a
    one-layer vision tower."""
    from transformers import AutoConfig

    default = AutoConfig.for_model(model_type)
    text_over, top_over = TINY_OVERRIDES.get(model_type, ({}, {}))
    text_default = default.get_text_config(decoder=True)
    text = _shrunk(text_default.to_dict(), TINY_TEXT)
    text.pop("per_layer_config", None)
    types = text.get("layer_types")
    if types:
        text["layer_types"] = list(dict.fromkeys(types))
    if text.get("kv_lora_rank"):  # MLA expands the latent into one K/V per query head
        text["num_key_value_heads"] = text["num_attention_heads"]
    if "qk_head_dim" in text:  # derived, and stored by transformers < 5.3
        text["qk_head_dim"] = text["qk_nope_head_dim"] + text["qk_rope_head_dim"]
    text.update(text_over)
    text["num_hidden_layers"] = len(text["layer_types"]) if types else 2
    if text.get("mlp_layer_types"):  # one dense and one MoE MLP where the defaults have both
        mlps = list(dict.fromkeys(text["mlp_layer_types"]))
        text["mlp_layer_types"] = (mlps * 2)[: text["num_hidden_layers"]]
    for key in [k for k in text if k.endswith(("_token_id", "_token_index"))]:
        if isinstance(text[key], int) and text[key] >= TINY_VOCAB:
            text[key] = TINY_VOCAB - 1
    if text_default is default:
        return type(default)(**text, **top_over)
    top = {}
    for name in default.sub_configs:
        sub = getattr(default, name, None)
        if sub is text_default:
            top[name] = text
        elif sub is not None:
            top[name] = _shrunk(sub.to_dict(), TINY_VISION)
    # placeholders (some configs name them through attribute_map) at the tiny ids, whether set
    # or left to checkpoints (None); other special ids inside the tiny vocabulary
    aliases = {real: alias for alias, real in type(default).attribute_map.items()}
    for key, value in default.to_dict().items():
        name = aliases.get(key, key)
        if name in PLACEHOLDER_ATTRS:
            top[key] = TINY_PLACEHOLDERS[name.split("_")[0]]
        elif key.endswith(("_token_id", "_token_index")) and isinstance(value, int):
            top[key] = min(value, TINY_VOCAB + 16)
    for key, value in top_over.items():
        top[key] = {**top[key], **value} if isinstance(value, dict) else value
    return type(default)(**top)


def tiny_family_model(model_type: str, seed: int = 0):
    """A tiny random model of any image-text-to-text family, or of a text-only causal LM
    family (see :func:`tiny_family_config`), fp32, eval mode, sdpa attention."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    auto = AutoModelForCausalLM
    if model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        auto = AutoModelForImageTextToText
    torch.manual_seed(seed)
    model = auto.from_config(tiny_family_config(model_type))
    try:
        model.set_attn_implementation("sdpa")
    except ValueError:  # a sub-model without SDPA (BLIP-2's Q-Former) keeps its own, before 5.3
        if not BEFORE_5_3:
            raise
    return model.float().eval()


def placeholder_inputs(
    model, batch: int = 1, pads: list[int] | None = None, seed: int = 0, length: int = 96
) -> dict:
    """``generate`` kwargs for a family model without pixels: text with two runs of image
    placeholder tokens (the decoder sees their embeddings), left padding ``pads[b]``, and
    ``mm_token_type_ids`` / ``token_type_ids`` when the model's forward takes them."""
    import inspect

    gen = torch.Generator().manual_seed(seed)
    pads = [0] * batch if pads is None else list(pads)
    ids = torch.randint(*TEXT_IDS, (batch, length), generator=gen)
    is_image = torch.zeros(batch, length, dtype=torch.bool)
    # one image shorter and one longer than the tiny sliding window (24)
    for start, size in ((length // 4, 16), (length // 2, 32)):
        is_image[:, start : start + size] = True
    ids[is_image] = IMAGE_ID
    mask = (torch.arange(length)[None, :] >= torch.tensor(pads)[:, None]).long()
    ids[mask == 0] = PAD_ID
    is_image &= mask.bool()
    inputs = {"input_ids": ids, "attention_mask": mask}
    params = inspect.signature(model.forward).parameters
    for name in ("mm_token_type_ids", "token_type_ids"):
        if name in params:
            inputs[name] = is_image.long()
    return inputs
