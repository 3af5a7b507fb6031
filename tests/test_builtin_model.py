"""The shipped tiny LLaVA: loads offline and answers VisualHaystack with a full cache."""

import json
import time

import pytest
import torch

from csp_inductor.evaluation import haystack as hs
from csp_inductor.evaluation.train import evaluate

PATH = hs.BUILTIN_MODEL_PATH
PER_TASK = 16

pytestmark = pytest.mark.skipif(
    not (PATH / "model.safetensors").exists(), reason=f"no shipped weights at {PATH}"
)


@pytest.fixture(scope="module")
def model():
    return hs.load_builtin_model()


def test_shipped_files_are_small_and_complete():
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (PATH / name).exists(), name
    assert (PATH / "model.safetensors").stat().st_size <= 20 * 2**20
    assert not list(PATH.glob("*.bin")) and not list(PATH.glob("*.pt"))


def test_config_is_a_real_llava_with_gqa(model):
    from transformers import LlavaConfig

    cfg = model.config
    assert isinstance(cfg, LlavaConfig)
    assert cfg.image_token_id == hs.IMAGE_TOKEN_ID
    assert cfg.text_config.model_type == "llama"
    assert cfg.text_config.num_key_value_heads < cfg.text_config.num_attention_heads
    assert cfg.vision_config.image_size == hs.IMAGE_SIZE
    assert cfg.vision_config.patch_size == hs.CELL
    raw = json.loads((PATH / "config.json").read_text())
    assert raw["model_type"] == "llava"


def test_tokenizer_and_processor_load_offline():
    from transformers import AutoProcessor, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(PATH), local_files_only=True)
    s = hs.make_sample("text_needle", 0, num_images=3)
    assert tok(s.prompt, add_special_tokens=False)["input_ids"] == s.input_ids.tolist()
    if (PATH / "processor_config.json").exists():
        proc = AutoProcessor.from_pretrained(str(PATH), local_files_only=True)
        images = [
            ((p * hs.PIXEL_STD + hs.PIXEL_MEAN) * 255).round().byte().permute(1, 2, 0).numpy()
            for p in s.pixel_values
        ]
        text = s.prompt.replace(" <image>" * hs.TOKENS_PER_IMAGE, " <image>")
        out = proc(images=images, text=text, return_tensors="pt", add_special_tokens=False)
        assert torch.equal(out["input_ids"][0], s.input_ids)
        torch.testing.assert_close(out["pixel_values"], s.pixel_values)


@pytest.fixture(scope="module")
def held_out_accuracy(model):
    samples = hs.make_split("test", PER_TASK * len(hs.TASKS), seed=1234)
    start = time.perf_counter()
    acc = evaluate(model, samples, batch_size=16)
    print(f"full-cache accuracy {acc} in {time.perf_counter() - start:.1f}s")
    return acc


@pytest.mark.parametrize("task", hs.TASKS)
def test_full_cache_accuracy_on_held_out_sample(held_out_accuracy, task):
    assert held_out_accuracy[task] >= 0.85, held_out_accuracy


def test_left_padding_does_not_change_answers(model):
    samples = [hs.make_sample(t, 7, num_images=3 + 5 * i) for i, t in enumerate(hs.TASKS)]
    batched = hs.collate(samples)
    with torch.no_grad():
        out = model.generate(**batched, max_new_tokens=3, do_sample=False)
        new = out[:, batched["input_ids"].shape[1] :]
        for row, s in enumerate(samples):
            alone = hs.collate([s])
            single = model.generate(**alone, max_new_tokens=3, do_sample=False)
            assert hs.decode(single[0, alone["input_ids"].shape[1] :]) == hs.decode(new[row])
