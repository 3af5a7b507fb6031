"""The evaluation harness and the command line, on the built-in model with tiny samples."""

import json
import subprocess
import sys

import pytest
import torch

from csp_inductor import CSP, Full, SnapKV
from csp_inductor.__main__ import main
from csp_inductor.evaluation.eval import PolicySpec, format_table


def test_policy_specs():
    assert PolicySpec.parse("full").build(0.2) == Full()
    assert PolicySpec.parse("snapkv").build(0.05) == SnapKV(budget=0.05, window_ratio=0.025)
    spec = PolicySpec.parse("csp:n=0,cross_ratio=0.9,faithful=true")
    assert spec.label == "csp:n=0,cross_ratio=0.9,faithful=True"
    assert spec.build(0.2) == CSP(budget=0.2, window_ratio=0.1, n=0, cross_ratio=0.9, faithful=True)
    with pytest.raises(ValueError, match="unknown policy 'pyramid'"):
        PolicySpec.parse("pyramid")
    with pytest.raises(ValueError, match="must be key=value"):
        PolicySpec.parse("csp:n")


def test_policy_lists_split_on_semicolons_when_there_are_any():
    two = PolicySpec.parse_list("csp:layers=pyramid,n=0; snapkv:layers=pyramid")
    assert [s.build(0.1) for s in two] == [
        CSP(budget=0.1, window_ratio=0.05, n=0, layers="pyramid"),
        SnapKV(budget=0.1, window_ratio=0.05, layers="pyramid"),
    ]
    assert [s.name for s in PolicySpec.parse_list("full,csp:layers=pyramid,snapkv")] == [
        "full", "csp", "snapkv",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="unknown policy 'n=0'"):
        PolicySpec.parse_list("csp:layers=pyramid,n=0")  # two options need ';'


def test_eval_cli_writes_json_and_plot(tmp_path, capsys):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    code = main(
        ["eval", "--samples", "1", "--policies", "full,csp,snapkv", "--budgets", "0.1,0.2",
         "--json", str(out), "--plot", str(png)]
    )  # fmt: skip
    assert code == 0
    report = json.loads(out.read_text())
    assert report["config"]["model"] == "builtin"  # no install path in committed results
    results = report["results"]
    runs = {(r["policy"], r["budget"]) for r in results}
    assert runs == {("full", 1.0), ("csp", 0.1), ("csp", 0.2), ("snapkv", 0.1), ("snapkv", 0.2)}
    for r in results:
        assert set(r) >= {"policy", "budget", "task", "accuracy", "n"}
        assert 0 <= r["accuracy"] <= 1
        # the pruned caches really hold about the budget (plus decode room), full holds all
        if r["policy"] == "full":
            assert r["kv_fraction"] >= 1.0
        else:
            assert r["kv_fraction"] < r["budget"] + 0.1
    assert png.stat().st_size > 1000
    assert "snapkv" in capsys.readouterr().out
    assert "budget" in format_table(results)


def test_eval_streamed_reports_accuracy_by_the_needles_chunk(tmp_path):
    out = tmp_path / "r.json"
    code = main(
        ["eval", "--samples", "2", "--policies", "csp", "--budgets", "0.2",
         "--prefill-chunk", "64", "--json", str(out)]
    )  # fmt: skip
    assert code == 0
    results = json.loads(out.read_text())["results"]
    assert json.loads(out.read_text())["config"]["prefill_chunk"] == 64
    every = next(r for r in results if r["task"] == "all")
    chunks = [r for r in results if r["task"].startswith("chunk ")]
    assert chunks and sum(r["n"] for r in chunks) == every["n"]  # every needle is known
    hits = sum(round(r["accuracy"] * r["n"]) for r in chunks)
    assert hits == round(every["accuracy"] * every["n"])
    assert every["kv_fraction"] < 0.3  # streamed, the prompt is still pruned to the budget


def test_cli_usage_errors(capsys):
    assert main([]) == 2
    with pytest.raises(SystemExit):
        main(["eval", "--budgets", "0,0.2"])


@pytest.mark.parametrize("command", ["demo", "chat", "eval", "check", "profile", "train"])
def test_every_command_prints_its_help(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0 and "usage:" in capsys.readouterr().out


def test_question_after_context_keeps_full_cache_answers():
    """Asking after the prefilled context changes nothing with a full cache (the oracle for the
    mode's positions and masks), while pruning then cannot see the question."""
    from csp_inductor.evaluation import haystack as hs
    from csp_inductor.evaluation.eval import run_haystack

    model = hs.load_builtin_model()
    data = hs.make_split("test", 12, seed=3)
    assert [hs.question_length(s) for s in data[:4]] == [7, 4, 9, 9]
    standard = run_haystack(model, data, Full(), batch_size=5)
    after = run_haystack(model, data, Full(), batch_size=5, question_after=True)
    assert after.correct == standard.correct and sum(standard.correct) >= 6
    pruned = run_haystack(model, data, CSP(budget=0.1, window_ratio=0.05), question_after=True)
    assert pruned.kv_bytes < 0.3 * pruned.full_kv_bytes


def test_evaluation_modules_run_under_their_names():
    from csp_inductor.evaluation import haystack
    from csp_inductor.evaluation.train import build_config

    assert build_config.__module__ == "csp_inductor.evaluation.train"
    assert haystack.BUILTIN_MODEL_PATH.is_dir()
    run = subprocess.run(
        [sys.executable, "-m", "csp_inductor.evaluation.train", "--help"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert "--out" in run.stdout


@pytest.fixture(scope="module")
def conversations():
    from csp_inductor.evaluation import haystack as hs

    data = hs.make_split("test", 8, seed=5, fill=hs.SPARSE_FILL, num_questions=3)
    return hs.load_builtin_model(), data


def test_conversation_answers_equal_one_forward_over_the_history(conversations):
    """With a full cache, every turn's answer is what the unmodified model predicts over the
    whole conversation in one forward (the turn machinery adds nothing), and it is right."""
    from csp_inductor.evaluation import haystack as hs
    from csp_inductor.evaluation.harness import _converse, pruning

    model, data = conversations
    sample = next(s for s in data if s.task == "comparison")
    with pruning(model, Full()):
        answers, kept = _converse(model, [sample])
    q = hs.question_length(sample)
    assert kept == [len(sample.input_ids) - q]
    history, spans = [sample.input_ids[:-q]], []
    questions = [sample.input_ids[-q:], *(fq for fq, _ in sample.followups)]
    for turn, (question, answer) in enumerate(zip(questions, answers[0], strict=True)):
        if turn:
            history.append(torch.tensor([hs.EOS_TOKEN_ID]))
        history.append(question)
        start = sum(map(len, history))
        spans.append((start, len(answer)))
        history.append(answer)
    ids = torch.cat(history)[None]
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=sample.pixel_values).logits[0]
    for (start, length), answer in zip(spans, answers[0], strict=True):
        assert logits[start - 1 : start - 1 + length].argmax(-1).tolist() == answer.tolist()
    expected = [sample.answer_ids, *(a for _, a in sample.followups)]
    assert [a.tolist() for a in answers[0]] == [e.tolist() for e in expected]


def test_conversation_mode_bounds(conversations):
    from csp_inductor import Oracle, RandomKeep
    from csp_inductor.evaluation.eval import run_conversations

    model, data = conversations
    full = run_conversations(model, data, Full(), batch_size=3)
    assert [len(c) for c in full.correct] == [1 + len(s.followups) for s in data]
    asked = sum(len(c) for c in full.correct)
    assert sum(map(sum, full.correct)) >= 0.9 * asked
    oracle = run_conversations(model, data, Oracle(budget=0.2, window_ratio=0.02), batch_size=3)
    assert sum(map(sum, oracle.correct)) >= 0.9 * asked
    assert 0.15 < oracle.kv_bytes / oracle.full_kv_bytes < 0.21
    random = run_conversations(model, data, RandomKeep(budget=0.2), batch_size=3)
    assert sum(map(sum, random.correct)) < sum(map(sum, oracle.correct))


def test_cli_conversation_mode(tmp_path):
    out = tmp_path / "conversation.json"
    code = main(
        ["eval", "--mode", "conversation", "--variant", "sparse", "--samples", "1",
         "--questions", "2", "--policies", "full,oracle,kvzip", "--budgets", "0.2",
         "--json", str(out)]
    )  # fmt: skip
    assert code == 0
    report = json.loads(out.read_text())
    assert report["config"]["mode"] == "conversation"
    rows = {(r["policy"], r["task"]): r for r in report["results"]}
    assert rows[("full", "text_needle")]["n"] == 1  # one passkey: one question
    assert rows[("kvzip", "image_needle")]["n"] == 2
    assert rows[("oracle", "all")]["kv_fraction"] < 0.25
    with pytest.raises(SystemExit):
        main(["eval", "--mode", "conversation", "--question-after"])
