"""``python -m csp_inductor check``: its report and exit status on saved tiny checkpoints: the
built-in model (served), a text-only LLM with its tokenizer (served), the built-in model whose
image processor cannot load (served, on text alone, and said so), a refused family, a truncated
weights file and a folder without a tokenizer or a config (unusable), and a backend deliberately
broken so that ``Full()`` is no longer exact."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import csp_inductor.transformers_attention
from csp_inductor.check import REFUSED, SERVED, UNUSABLE, main
from csp_inductor.evaluation.haystack import BUILTIN_MODEL_PATH, build_tokenizer
from csp_inductor.testing import tiny_family_model

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_builtin_model_is_served_from_the_command_line():
    out = subprocess.run(
        [sys.executable, "-m", "csp_inductor", "check", "--model", str(BUILTIN_MODEL_PATH)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == SERVED, out.stdout + out.stderr
    report = out.stdout
    assert "model_type='llava'" in report
    assert "layers 0-3: pruned (full attention)" in report
    assert re.search(r"\(\d+ visual\), from the model's processor, a generated", report)
    assert re.search(r"Full\(\) +exact: 8 of 8 greedy tokens", report)
    kept, prompt = map(int, re.search(r"keeps (\d+) of (\d+) tokens", report).groups())
    assert kept == int(prompt * 0.2)


@pytest.fixture(scope="module")
def text_llm(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2")
    tiny_family_model("qwen2").save_pretrained(path)
    return path


def test_a_text_only_model_with_its_tokenizer_is_served(text_llm, tmp_path, capsys):
    path = tmp_path / "qwen2"
    shutil.copytree(text_llm, path)
    build_tokenizer().save_pretrained(path)
    assert main(["--model", str(path), "--new-tokens", "4"]) == SERVED
    report = capsys.readouterr().out
    assert "visual tokens: none" in report
    assert "(0 visual), from the model's processor\n" in report
    assert "exact: 4 of 4" in report
    kept, prompt = map(int, re.search(r"keeps (\d+) of (\d+) tokens", report).groups())
    assert kept == int(prompt * 0.2)


def test_a_checkpoint_without_a_tokenizer_is_unusable(text_llm, capsys):
    assert main(["--model", str(text_llm)]) == UNUSABLE
    # (transformers makes an empty tokenizer of the config's class)
    assert "made a prompt the model cannot read" in capsys.readouterr().out


def test_without_its_image_processor_a_vlm_is_checked_on_text(tmp_path, capsys):
    shutil.copytree(BUILTIN_MODEL_PATH, tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "processor_config.json").read_text())
    config["image_processor"]["image_processor_type"] = "AbsentImageProcessor"
    (tmp_path / "processor_config.json").write_text(json.dumps(config))
    assert main(["--model", str(tmp_path)]) == SERVED
    report = capsys.readouterr().out
    assert "(0 visual), from the model's tokenizer, text only: its processor could not" in report
    assert "served for text (the prompt had no visual tokens: they are unchecked)" in report


def test_a_refused_family_exits_1_with_the_reason(tmp_path, capsys):
    tiny_family_model("mllama").save_pretrained(tmp_path)
    assert main(["--model", str(tmp_path)]) == REFUSED
    report = capsys.readouterr().out
    assert re.search(r"refused +csp_inductor cannot serve model_type='mllama'", report)
    assert "only as cross-attention K/V" in report


def test_a_truncated_checkpoint_is_unusable(tmp_path, capsys):
    shutil.copytree(BUILTIN_MODEL_PATH, tmp_path, dirs_exist_ok=True)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert main(["--model", str(tmp_path)]) == UNUSABLE
    assert f"the checkpoint at {tmp_path} could not be loaded" in capsys.readouterr().out


def test_a_folder_without_a_config_is_unusable(tmp_path, capsys):
    assert main(["--model", str(tmp_path)]) == UNUSABLE
    assert f"no transformers config could be read at {tmp_path}" in capsys.readouterr().out
    assert main(["--model", str(tmp_path / "absent")]) == UNUSABLE
    assert f"no checkpoint folder at {tmp_path / 'absent'}" in capsys.readouterr().out


def test_a_backend_that_is_not_exact_exits_1(monkeypatch, capsys):
    decode = csp_inductor.transformers_attention.decode_attention

    def broken(q, keys, values, **options):  # decode steps read negated values
        return decode(q, keys, -values, **options)

    monkeypatch.setattr(csp_inductor.transformers_attention, "decode_attention", broken)
    assert main(["--model", str(BUILTIN_MODEL_PATH)]) == REFUSED
    report = capsys.readouterr().out
    assert re.search(r"Full\(\) +NOT EXACT: \d of 8 greedy tokens", report)
    assert "NOT served: Full() differs from the unmodified model" in report


def test_bad_arguments_name_the_value(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--model", str(BUILTIN_MODEL_PATH), "--new-tokens", "0"])
    assert exit.value.code == 2
    assert "--new-tokens must be >= 1, got 0" in capsys.readouterr().err


def test_the_probe_image_is_the_same_every_run():
    from csp_inductor.check import probe_image

    first, second = probe_image(), probe_image()
    assert first.size == (256, 256) and first.mode == "RGB"
    assert first.tobytes() == second.tobytes()
    assert len(set(first.tobytes())) > 200  # structure, not one colour
