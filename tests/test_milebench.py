"""MileBench adapter: loading the in-repo fixture, prompts, metrics, errors, a tiny VLM end to end.

The fixture (tests/fixtures/milebench, made by make_fixture.py there) has MileBench's layout:
WebQA (multi-choice, 3 samples) and IEdit (open-ended, 2 samples), 16×16 PNGs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from csp_inductor.evaluation import milebench as mb
from csp_inductor.evaluation.milebench import MileSample

FIXTURE = Path(__file__).parent / "fixtures" / "milebench"
WEBQA_INSTRUCTION = (
    "Look at the images and answer the question. You must choose your answer from the Choice List. "
)


@pytest.fixture(scope="module")
def webqa() -> list[MileSample]:
    return mb.load_dataset(FIXTURE, "WebQA")


@pytest.fixture(scope="module")
def iedit() -> list[MileSample]:
    return mb.load_dataset(FIXTURE, "IEdit")


def _sample(context: str, n_images: int = 2, **kw) -> MileSample:
    paths = tuple(FIXTURE / "WebQA" / "images" / f"{i}.png" for i in range(n_images))
    fields = {"dataset": "WebQA", "sample_id": 7, "instruction": "Do it.", "response": "x"}
    return MileSample(context=context, image_paths=paths, **{**fields, **kw})


# --------------------------------------------------------------------------- loading


def test_load_fixture(webqa, iedit):
    assert [s.sample_id for s in webqa] == [0, 1, 2]
    first = webqa[0]
    assert first.instruction == WEBQA_INSTRUCTION
    assert first.choices == ("The first square", "The second square", "Neither square")
    assert first.response == "The first square"
    assert first.question_type == "multi-choice"
    assert first.image_quantity_level == "Few"
    assert [p.name for p in first.image_paths] == ["0.png", "1.png"]
    assert all(p.is_file() for s in webqa for p in s.image_paths)
    assert webqa[1].instruction.startswith("Based on the images")  # task_instruction_id = 1
    assert len(iedit) == 2 and iedit[0].choices is None and iedit[0].question_type == "open-ended"
    assert mb.load_dataset(FIXTURE, "WebQA", limit=1) == webqa[:1]


def test_load_images_rgb(webqa):
    images = mb.load_images(webqa[0])
    assert [img.size for img in images] == [(16, 16), (16, 16)]
    assert images[0].mode == "RGB" and images[0].getpixel((15, 15)) == (200, 30, 30)  # red


# --------------------------------------------------------------------------- prompts


def test_prompt_text_is_milebench_format(webqa, iedit):
    assert mb.prompt_text(webqa[0]) == (
        WEBQA_INSTRUCTION + "\n{image#1}Image Caption #1: a red square. {image#2}Image Caption "
        "#2: a blue square. Question: Which square is red?\nChoice list: \nA. The first square\n"
        "B. The second square\nC. Neither square\nYour answer is: "
    )
    assert "Choice list" not in mb.prompt_text(iedit[0])
    assert mb.prompt_text(iedit[0]).endswith(
        "\nSource Image:{image#1} Target Image:{image#2}Instruction:"
    )


def test_unlettered_choices_for_gpr1200():
    s = _sample("{image#1}Which?", n_images=1, dataset="GPR1200", choices=("cat", "dog"))
    assert mb.prompt_text(s).endswith("Choice list: \ncat\ndog\nYour answer is: ")


def test_segments_replace_placeholders_in_order(webqa):
    assert mb.prompt_segments(webqa[1])[:4] == [webqa[1].instruction + "\nCompare ", 0, " with ", 1]
    # out-of-order placeholders keep their own image, {table#k} counts as an image,
    # an image that no placeholder mentions goes first
    s = _sample("B {image#2} then A {table#1}.", n_images=3)
    assert mb.prompt_segments(s) == [2, "Do it.\nB ", 1, " then A ", 0, "."]


def test_messages_interleave_images_and_text(webqa):
    messages, images = mb.build_messages(webqa[0])
    content = messages[0]["content"]
    assert messages[0]["role"] == "user"
    assert [c["type"] for c in content] == ["text", "image", "text", "image", "text"]
    assert content[0]["text"] == WEBQA_INSTRUCTION + "\n"
    assert "A. The first square" in content[-1]["text"]
    assert [img.getpixel((15, 15)) for img in images] == [(200, 30, 30), (40, 60, 210)]
    _, images = mb.build_messages(_sample("{image#2}{image#1}{image#2}"))
    blue, red = (40, 60, 210), (200, 30, 30)
    assert [img.getpixel((15, 15)) for img in images] == [blue, red, blue]


# --------------------------------------------------------------------------- metrics


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Hello, World!", "hello world"),  # next to a space: dropped; inside: a space, stripped
        ("1,000 apples.", "1000 apples"),  # a number with a comma drops all punctuation
        ("pi is 3.14", "pi is 3.14"),  # a period before a digit stays
        ("don't-stop\nnow", "don't stop now"),
        ('"Quoted"', "quoted"),
    ],
)
def test_normalize_answer(text, expected):
    assert mb.normalize_answer(text) == expected


CHOICES = ("The first square", "The second square", "Neither square")


@pytest.mark.parametrize(
    ("prediction", "letter"),
    [
        ("B", "B"),  # a bare letter
        ("b", "B"),
        ("A. The first square", "A"),  # letter + text
        ("I pick (C) neither square!", "C"),
        ("It is the second square.", "B"),  # option text alone
        ("thesecond  square", "B"),  # spaces ignored when matching text
        ("", "C"),  # MileBench maps an empty answer to C
        ("...", "C"),  # normalizes to empty
        ("The answer is B", "AB"),  # every option letter in the answer: counted wrong
        ("I think b", "B"),
    ],
)
def test_match_choice(prediction, letter):
    assert mb.match_choice(prediction, CHOICES) == letter


def test_match_choice_regex_characters_are_literal():
    choices = ("x+y (a)", "x*y [b]")
    assert mb.match_choice("surely x*y [b]", choices) == "B"
    assert mb.multiple_choice_correct("x+y (a)", "x+y (a)", choices)


def test_multiple_choice_correct_needs_response_among_choices():
    assert mb.multiple_choice_correct("The second square", "the second square.", CHOICES)
    with pytest.raises(ValueError, match="not one of the choices"):
        mb.multiple_choice_correct("A", "a circle", CHOICES)


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("the cat sat on the mat", "the cat is on the mat", 5 / 6),  # LCS 5 of 6 and 6
        ("a b c", "a x b y c z", 2 * 1.0 * 0.5 / 1.5),  # P 1, R 1/2
        ("c b a", "a b c", 1 / 3),  # order matters: LCS 1
        ("The Cat.", "the cat", 1.0),  # normalized first
        ("dog", "the cat", 0.0),
        ("", "the cat", 0.0),
    ],
)
def test_rouge_l_known_pairs(prediction, reference, expected):
    assert mb.rouge_l(prediction, reference) == pytest.approx(expected)


def test_metric_for_follows_milebench():
    assert mb.metric_for("WebQA", "multi-choice") == "choice"
    assert mb.metric_for("IEdit", "open-ended") == "rouge_l"
    assert mb.metric_for("ALFRED", "") == "rouge_l"  # its file leaves question_type empty
    assert mb.metric_for("TextNeedleInAHaystack", "open-ended") == "needle_token"
    assert mb.metric_for("MMCoQA", "multi-choice") == "needle_substring"
    assert mb.metric_for("Unknown", "", has_choices=True) == "choice"
    with pytest.raises(ValueError, match="cannot tell how to score"):
        mb.metric_for("Unknown", "")


def test_score_fixture_predictions(webqa, iedit):
    mc = mb.score("WebQA", ["A", "Image 2 is green", "the answer is B"], webqa)
    assert (mc["metric"], mc["matcher"], mc["n"]) == ("accuracy", "choice", 3)
    assert [r["score"] for r in mc["per_sample"]] == [1.0, 1.0, 0.0]
    assert mc["score"] == pytest.approx(2 / 3)
    assert mc["by_image_quantity_level"] == {"Few": pytest.approx(2 / 3)}
    oe = mb.score("IEdit", ["Make the red square blue", ""], iedit)
    assert oe["metric"] == "rouge_l" and oe["score"] == pytest.approx(0.5)


def test_score_needle_datasets():
    s = _sample("{image#1}", n_images=1, dataset="TextNeedleInAHaystack", response="Otter")
    assert mb.score(s.dataset, ["the password is otter."], [s])["score"] == 1.0
    assert mb.score(s.dataset, ["otters"], [s])["score"] == 0.0  # a whole token is needed
    s = _sample("{image#1}", n_images=1, dataset="MMCoQA", response="Otter")
    assert mb.score(s.dataset, ["otters"], [s])["score"] == 1.0


def test_score_rejects_mismatched_inputs(webqa):
    with pytest.raises(ValueError, match="2 predictions for 3 samples"):
        mb.score("WebQA", ["A", "B"], webqa)
    with pytest.raises(ValueError, match="samples from"):
        mb.score("IEdit", ["A", "B", "C"], webqa)


# --------------------------------------------------------------------------- errors


def test_missing_data_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data directory .*nowhere.* does not exist"):
        mb.load_dataset(tmp_path / "nowhere", "WebQA")


def test_missing_dataset_lists_what_exists():
    with pytest.raises(FileNotFoundError, match=r"ALFRED does not exist.*\['IEdit', 'WebQA'\]"):
        mb.load_dataset(FIXTURE, "ALFRED")


def test_missing_json_and_image(tmp_path):
    shutil.copytree(FIXTURE / "WebQA", tmp_path / "WebQA")
    (tmp_path / "WebQA" / "images" / "3.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"sample 1.*image .*3\.png does not exist"):
        mb.load_dataset(tmp_path, "WebQA")
    (tmp_path / "WebQA" / "WebQA.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"WebQA\.json does not exist"):
        mb.load_dataset(tmp_path, "WebQA")


def test_malformed_json(tmp_path):
    (tmp_path / "X").mkdir()
    (tmp_path / "X" / "X.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        mb.load_dataset(tmp_path, "X")
    payload = {"meta_data": {"task_instruction": ["i"]}, "data": [{"sample_id": 0}]}
    (tmp_path / "X" / "X.json").write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="missing field 'task_instance'"):
        mb.load_dataset(tmp_path, "X")
    bad = {"context": "{image#2}", "images_path": []}
    payload["data"] = [{"sample_id": 0, "task_instance": bad, "response": "r"}]
    (tmp_path / "X" / "X.json").write_text(json.dumps(payload))
    with pytest.raises(ValueError, match="placeholder #2 in context but the sample has 0 images"):
        mb.load_dataset(tmp_path, "X")


def test_missing_model(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist.*never downloaded"):
        mb.load_model(tmp_path / "llava-1.5-7b-hf")
    with pytest.raises(FileNotFoundError, match=r"has no config\.json"):
        mb.load_model(tmp_path)
    with pytest.raises(ValueError, match="needs a model"):
        mb.run(None, None, [])


# --------------------------------------------------------------------------- tiny VLM


PATCHES_PER_IMAGE = 4  # 16×16 images, 8×8 patches; the CLS feature is dropped ("default")
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | upper }}: {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %}\n"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def _tiny_processor(chat_template: str | None = CHAT_TEMPLATE):
    """A LLaVA processor built offline: a byte-level BPE trained on a few words, a PIL CLIP
    image processor at 16×16 and a minimal chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlavaProcessor, PreTrainedTokenizerFast
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<pad>", "<s>", "</s>", "<image>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(
        ["Choice list: Your answer is: the first square source target"], trainer
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=chat_template,
    )


@pytest.fixture(scope="module")
def tiny_vlm():
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    processor = _tiny_processor()
    tok = processor.tokenizer
    vision = CLIPVisionConfig(
        image_size=16, patch_size=8, hidden_size=32, intermediate_size=64,
        num_hidden_layers=1, num_attention_heads=2, projection_dim=32,
    )  # fmt: skip
    text = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config).eval(), processor


def test_inputs_through_chat_template(tiny_vlm, webqa):
    _, processor = tiny_vlm
    inputs = mb.build_inputs(processor, webqa[0])
    ids = inputs["input_ids"][0]
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert int((ids == image_id).sum()) == 2 * PATCHES_PER_IMAGE
    assert tuple(inputs["pixel_values"].shape) == (2, 3, 16, 16)
    text = processor.tokenizer.decode(ids)
    assert text.startswith("USER: " + WEBQA_INSTRUCTION) and text.endswith("ASSISTANT:")
    assert "A. The first square\nB. The second square" in text


def test_inputs_without_chat_template(webqa):
    processor = _tiny_processor(chat_template=None)
    inputs = mb.build_inputs(processor, webqa[1])
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert int((inputs["input_ids"][0] == image_id).sum()) == 2 * PATCHES_PER_IMAGE
    assert "ASSISTANT" not in processor.tokenizer.decode(inputs["input_ids"][0])


def test_end_to_end_on_fixture(tiny_vlm, tmp_path):
    model, processor = tiny_vlm
    for name in ("WebQA", "IEdit"):
        result = mb.evaluate(model, processor, FIXTURE, name, max_new_tokens=3)
        assert len(result["predictions"]) == result["n"] == (3 if name == "WebQA" else 2)
        assert all(isinstance(p, str) for p in result["predictions"])
        assert 0.0 <= result["score"] <= 1.0
    samples = mb.load_dataset(FIXTURE, "WebQA")
    # greedy and deterministic; the same checkpoint saved and reloaded gives the same answers
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reloaded, reloaded_processor = mb.load_model(tmp_path)
    first = mb.run(model, processor, samples, max_new_tokens=3)
    assert mb.run(reloaded, reloaded_processor, samples, max_new_tokens=3) == first
