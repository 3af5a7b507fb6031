"""Memory of the model-built prefill masks, the one place the backend holds an L×L tensor.

Models whose prefill mask is not plain causal or sliding-window (Gemma 3/4's bidirectional
images, PaliGemma's prefix block, Molmo 2) get their own mask from transformers through the
backend's mask function: a dense (batch, 1, L, L) bool tensor, as transformers' SDPA path
builds. Providers, per prompt length L (``CSP_BENCH_MASK_CONTEXTS``, default 4096,16384), one
row, two 1024-token images in the prompt:

- ``model_mask``: ``create_causal_mask`` of a Gemma 3 text config with the images as
  bidirectional blocks, through the backend's mask function: the tensor's bytes and the peak
  RSS growth of building it in a fresh process;
- ``causal``: the same call without images: the backend's function returns None (its attention
  applies the causal mask and sliding window itself), so nothing is allocated.
"""

from __future__ import annotations

import pytest
from conftest import env_ints, peak_rss_growth, record

CONTEXTS = env_ints("CSP_BENCH_MASK_CONTEXTS", "4096,16384")

SETUP = """
import torch
from transformers import AttentionInterface, Gemma3TextConfig
from transformers.masking_utils import AttentionMaskInterface, create_causal_mask
from csp_inductor.backend.install import ATTN_NAME
from csp_inductor.transformers_attention import csp_attention, model_mask
AttentionInterface.register(ATTN_NAME, csp_attention)
AttentionMaskInterface.register(ATTN_NAME, model_mask)
config = Gemma3TextConfig(num_hidden_layers=1)
config._attn_implementation = ATTN_NAME
length = {length}
embeds = torch.empty(1, length, 1)
blocks = torch.full((1, length), -1)
blocks[0, 1000:2024] = 0
blocks[0, 3000:4024] = 1
blocks = blocks if {images} else None
"""
RUN = "mask = create_causal_mask(config, embeds, None, None, block_sequence_ids=blocks)"


@pytest.mark.parametrize("images", [True, False], ids=["model_mask", "causal"])
@pytest.mark.parametrize("length", CONTEXTS)
def test_prefill_mask_memory(benchmark, length, images):
    setup = SETUP.format(length=length, images=images)
    namespace: dict = {}
    exec(setup, namespace)
    mask = benchmark.pedantic(lambda: eval(RUN.split(" = ")[1], namespace), rounds=1)
    nbytes = 0 if mask is None else mask.untyped_storage().nbytes()
    assert (mask is not None) == images
    peak = peak_rss_growth(setup, RUN)
    record(
        benchmark,
        shapes={"length": length, "images": images},
        mask_bytes=nbytes,
        mask_mib=nbytes / 2**20,
        peak_rss_growth_mib=None if peak is None else peak / 2**20,
    )
