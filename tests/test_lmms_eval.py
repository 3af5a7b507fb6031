"""The lmms-eval model (``csp_inductor.evaluation.lmms_plugin``) and the local VisualHaystack
task, in an environment with lmms-eval (``make test-lmms``; run from the repository's root, as
the task's data path is relative)."""

from pathlib import Path

import pytest

pytest.importorskip("lmms_eval")

from lmms_eval import evaluator
from lmms_eval.models import get_model
from lmms_eval.tasks import TaskManager

from csp_inductor import CSP, SnapKV
from csp_inductor.evaluation import haystack as hs
from csp_inductor.evaluation.eval import run_haystack
from csp_inductor.evaluation.lmms_plugin import CSPInductor

TASKS = Path(__file__).parents[1] / "csp_inductor" / "evaluation" / "lmms_tasks"
TASK = "visual_haystack_csp"
DOCS = 8


@pytest.fixture(scope="module")
def task_manager():
    return TaskManager(include_path=str(TASKS))


def _model(args: str) -> CSPInductor:
    return get_model("csp_inductor").create_from_arg_string(
        args, {"batch_size": None, "device": "cpu"}
    )


def test_registered_through_entry_points(task_manager):
    assert get_model("csp_inductor") is CSPInductor
    assert TASK in task_manager.all_tasks


def test_model_args_choose_the_policy():
    model = _model("policy=snapkv,budget=0.1,window_ratio=0.05,batch_size=2")
    assert model.policy == SnapKV(0.1, window_ratio=0.05) == model.model.csp_backend.policy
    assert model.batch_size == 2
    with pytest.raises(ValueError, match="policy='nope' is not a policy"):
        _model("policy=nope")
    with pytest.raises(ValueError, match=r"has no option\(s\) \['bugdet'\]"):
        _model("policy=csp,bugdet=0.1")


@pytest.mark.parametrize("args", ["policy=full", "policy=csp,budget=0.1"])
def test_lmms_eval_scores_what_the_backend_scores(task_manager, args):
    """lmms-eval's run of the local task (batched, through lmms-eval's chat messages and the
    model's processor) gets, prompt by prompt, the answers csp_inductor's own evaluation gets
    for the same prompts and policy; the KV bytes held are reported."""
    model = _model(f"{args},batch_size=4")
    vlm = model.model  # (lmms-eval's clean-up drops the model's modules after the run)
    out = evaluator.simple_evaluate(
        model=model, tasks=[TASK], limit=DOCS, task_manager=task_manager, log_samples=True
    )
    logged = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    got = [bool(s["exact_match"]) for s in logged]
    samples = hs.make_split("test", 16, seed=7)[:DOCS]
    want = run_haystack(vlm, samples, model.policy, batch_size=4).correct
    assert got == want
    accuracy = out["results"][TASK]["exact_match,none"]
    assert accuracy == sum(want) / DOCS
    assert model.kv_bytes > 0 and model.full_kv_bytes > 0
    if isinstance(model.policy, CSP):
        assert model.kv_bytes < 0.5 * model.full_kv_bytes
    print(f"{args}: accuracy {accuracy:.3f}, KV {model.kv_bytes / model.full_kv_bytes:.1%} of full")
