"""Helpers shared by the tests and the benchmarks, one module per concern:

- :mod:`.prompts`: random prompts (one layer's queries and keys with a modality layout);
- :mod:`.reference`: the reference selection of every covered policy;
- :mod:`.authors`: the CSP authors' ``softmax_n`` and their dense scoring;
- :mod:`.generation`: greedy generation, compared;
- :mod:`.tiny`: tiny models of every supported family, from hand-written configs;
- :mod:`.families`: tiny models of any family, from transformers' config defaults;
- :mod:`.long_context`: the long-context LLaVA and image-heavy prompts of the benchmarks.

The library never imports this package; the ``profile`` command line
(:mod:`csp_inductor.__main__`) uses :mod:`.long_context`'s model.
"""

from .authors import authors_dense_scores, authors_softmax_n
from .families import (
    TINY_OVERRIDES,
    TINY_PLACEHOLDERS,
    TINY_TEXT,
    TINY_VISION,
    known_model_types,
    placeholder_inputs,
    tiny_family_config,
    tiny_family_model,
)
from .generation import assert_same_generation, greedy
from .long_context import TOKENS_PER_IMAGE, image_heavy_prompt, long_context_llava
from .prompts import LAYOUTS, RandomPrompt, random_prompt
from .reference import COVERED, reference_select
from .tiny import (
    BOS_ID,
    EOS_ID,
    FAMILIES,
    IMAGE_ID,
    PAD_ID,
    TEXT_IDS,
    TEXT_ONLY,
    TINY_VOCAB,
    VIDEO_ID,
    VISION_END_ID,
    VISION_START_ID,
    tiny_inputs,
    tiny_model,
)

__all__ = [
    "BOS_ID",
    "COVERED",
    "EOS_ID",
    "FAMILIES",
    "IMAGE_ID",
    "LAYOUTS",
    "PAD_ID",
    "TEXT_IDS",
    "TEXT_ONLY",
    "TINY_OVERRIDES",
    "TINY_PLACEHOLDERS",
    "TINY_TEXT",
    "TINY_VISION",
    "TINY_VOCAB",
    "TOKENS_PER_IMAGE",
    "VIDEO_ID",
    "VISION_END_ID",
    "VISION_START_ID",
    "RandomPrompt",
    "assert_same_generation",
    "authors_dense_scores",
    "authors_softmax_n",
    "greedy",
    "image_heavy_prompt",
    "known_model_types",
    "long_context_llava",
    "placeholder_inputs",
    "random_prompt",
    "reference_select",
    "tiny_family_config",
    "tiny_family_model",
    "tiny_inputs",
    "tiny_model",
]
