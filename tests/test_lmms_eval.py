"""The lmms-eval model (``csp_inductor.evaluation.lmms_plugin``) and the local VisualHaystack
task, in an environment with lmms-eval (``make test-lmms``)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lmms_eval")

from lmms_eval import evaluator
from lmms_eval.models import get_model
from lmms_eval.tasks import TaskManager

import csp_inductor
from csp_inductor import CSP, SnapKV
from csp_inductor.evaluation import haystack as hs
from csp_inductor.evaluation.harness import _generate
from csp_inductor.evaluation.lmms_plugin import CSPInductor

ROOT = Path(__file__).parents[1]
TASKS = ROOT / "csp_inductor" / "evaluation" / "lmms_tasks"
TASK = "visual_haystack_csp"
DOCS = 8


@pytest.fixture(autouse=True)
def _at_the_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the task's data path is relative to the repository's root


@pytest.fixture(scope="module")
def task_manager():
    return TaskManager(include_path=str(TASKS))


def _model(args: str, batch_size: str = "1") -> CSPInductor:
    """As lmms-eval's command line makes it (``--batch_size`` as a string, no device)."""
    config = {"batch_size": batch_size, "max_batch_size": None, "device": None}
    return get_model("csp_inductor").create_from_arg_string(args, config)


def _backend_answers(model) -> tuple[list[hs.Sample], list[str]]:
    """The task's first ``DOCS`` prompts and ``model``'s answers to them, 4 per batch."""
    samples = hs.make_split("test", 16, seed=7)[:DOCS]
    answers = []
    for start in range(0, DOCS, 4):
        new = _generate(model, hs.collate(samples[start : start + 4]), max_new_tokens=4)
        answers += [hs.decode(ids) for ids in new]
    return samples, answers


def _docs(n: int) -> list[dict]:
    from csp_inductor.evaluation.lmms_tasks.visual_haystack_csp import utils

    return [utils.doc_to_messages({"index": i}) for i in range(n)]


def test_registered_through_entry_points(task_manager):
    assert get_model("csp_inductor") is CSPInductor
    assert TASK in task_manager.all_tasks


def test_model_args_choose_the_policy_and_bad_ones_are_named():
    model = _model("policy=snapkv,budget=0.1,window_ratio=0.05", batch_size="2")
    assert model.policy == SnapKV(0.1, window_ratio=0.05) == model.model.csp_backend.policy
    assert model.batch_size == 2
    streamed = _model("policy=csp,budget=0.2,prefill_chunk=64,max_cache_tokens=512")
    options = streamed.model.csp_backend.options
    assert (options.prefill_chunk, options.max_cache_tokens) == (64, 512)
    bad = {
        "policy=nope": "policy='nope' is not a policy",
        "policy=oracle": "policy='oracle' is not a policy",
        "policy=csp,bugdet=0.1": r"has no option\(s\) \['bugdet'\]",
        "compile=yes": "compile must be true or false",
        "dtype=float16": "dtype must be auto",
        "prefill_chunk=0": "prefill_chunk must be None .* or an int >= 1, got prefill_chunk=0",
    }
    for args, message in bad.items():
        with pytest.raises(ValueError, match=message):
            _model(args)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        _model("policy=full", batch_size="auto")


def test_batches_are_the_built_in_prompts():
    """The task's chats, batched by the model, are exactly the built-in prompts (token ids,
    left padding, each prompt's images in order)."""
    model = _model("policy=full")
    samples = hs.make_split("test", 16, seed=7)[:3]
    got = model.inputs(_docs(3))
    want = hs.collate(samples)
    assert torch.equal(got["input_ids"], want["input_ids"])
    assert torch.equal(got["attention_mask"], want["attention_mask"])
    torch.testing.assert_close(got["pixel_values"], want["pixel_values"])


def test_a_chat_template_tokenizes_as_transformers_does():
    model = _model("policy=full")
    model.processor.chat_template = (
        "{{ bos_token }}{% for m in messages %}{% for c in m['content'] %}"
        "{% if c['type'] == 'text' %}{{ c['text'] }} {% else %}<image> {% endif %}"
        "{% endfor %}{% endfor %}"
    )
    chat = _docs(1)[0]
    got = model.inputs([chat])
    from lmms_eval.protocol import ChatMessages

    hf = ChatMessages(messages=chat).to_hf_messages()
    want = model.processor.apply_chat_template(
        hf, tokenize=True, return_dict=True, add_generation_prompt=True, return_tensors="pt"
    )
    assert torch.equal(got["input_ids"], want["input_ids"])


def test_sampling_is_refused():
    model = _model("policy=full")
    from lmms_eval.api.instance import Instance

    request = Instance(
        request_type="generate_until", doc={}, idx=0,
        arguments=("", None, {"do_sample": True, "temperature": 1.0}, 0, TASK, "test"),
        metadata={"task": TASK, "doc_id": 0, "repeats": 1},
    )  # fmt: skip
    with pytest.raises(ValueError, match="decodes greedily"):
        model.generate_until([request])


@pytest.mark.parametrize("args", ["policy=full", "policy=csp,budget=0.1"])
def test_lmms_eval_answers_as_the_backend(task_manager, args):
    """lmms-eval's run of the local task (batched, through its chat messages, the model's
    processor and the task's stop strings) gives, prompt by prompt, the answers of a plain
    batched ``generate`` under the same policy; the KV bytes held are reported."""
    model = _model(args, batch_size="4")
    vlm = model.model  # (lmms-eval's clean-up drops the model's modules after the run)
    out = evaluator.simple_evaluate(
        model=model, tasks=[TASK], limit=DOCS, task_manager=task_manager, log_samples=True
    )
    logged = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    got = [" ".join(s["filtered_resps"][0].split()) for s in logged]
    samples, want = _backend_answers(vlm)
    assert got == want
    correct = [hs.score(answer, s) for answer, s in zip(want, samples, strict=True)]
    accuracy = out["results"][TASK]["exact_match,none"]
    assert accuracy == sum(correct) / DOCS
    assert model.kv_bytes > 0 and model.full_kv_bytes > 0
    if isinstance(model.policy, CSP):
        assert model.kv_bytes < 0.5 * model.full_kv_bytes
    print(f"{args}: accuracy {accuracy:.3f}, KV {model.kv_bytes / model.full_kv_bytes:.1%} of full")


def test_lmms_eval_across_processes(tmp_path):
    """lmms-eval under ``torchrun`` (2 processes, gloo) shares the task's docs out; every doc
    gets the answer one process gives it."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "lmms_eval", "--model", "csp_inductor",
        "--model_args", "pretrained=builtin,policy=csp,budget=0.1", "--batch_size", "4",
        "--tasks", TASK, "--include_path", str(TASKS), "--limit", str(DOCS),
        "--output_path", str(tmp_path), "--log_samples",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    (logged,) = tmp_path.glob("*/*_samples_*.jsonl")
    rows = sorted(map(json.loads, logged.read_text().splitlines()), key=lambda r: r["doc_id"])
    assert [r["doc_id"] for r in rows] == list(range(DOCS))
    got = [" ".join(str(r["filtered_resps"]).split()) for r in rows]
    model = csp_inductor.compile(hs.load_builtin_model(), CSP(0.1), compile=False)
    samples, want = _backend_answers(model)
    assert got == want
    correct = [float(hs.score(answer, s)) for answer, s in zip(want, samples, strict=True)]
    assert [r["exact_match"] for r in rows] == correct
    assert 0 < sum(correct) < DOCS  # CSP at 10% gets some wrong: the comparison is not vacuous
