"""The chat command: a conversation with the built-in model, one pruned cache for every turn."""

import io
import re

import pytest

from csp_inductor.chat import main
from csp_inductor.evaluation import haystack as hs


def questions_and_answers(seed: int = 7, task: str = "cross_modal"):
    sample = hs.make_sample(task, seed, num_images=8, num_questions=3)
    question = sample.input_ids[len(sample.input_ids) - hs.question_length(sample) :]
    pairs = [(question, sample.answer_ids), *sample.followups]
    return [(hs.decode(q), hs.decode(a)) for q, a in pairs]


@pytest.mark.parametrize(
    "policy, options", [("full", []), ("csp", []), ("full", ["--prefill-chunk", "64"])]
)
def test_chat_answers_every_turn_and_reports_the_kv_held(policy, options, capsys):
    # (streamed with a keep-all policy, the context gives the unmodified model's answers)
    pairs = questions_and_answers()
    stdin = io.StringIO("".join(f"{q}\n" for q, _ in pairs) + "\nwhat is hello ?\n")
    assert main(["--policy", policy, *options], stdin=stdin) == 0
    out = capsys.readouterr().out
    answers = re.findall(r"^> (.*)$", out, flags=re.M)
    report = r"KV held [\d.]+ KiB: (\d+) tokens of (\d+) seen \(this turn kept (\d+) of (\d+)"
    held = re.findall(report, out)
    assert len(answers) == len(held) == len(pairs)
    assert "not in the model's vocabulary: 'hello'" in out
    tokens = [(int(a), int(b), int(c), int(d)) for a, b, c, d in held]
    for (rows, seen, kept, turn), previous in zip(tokens, [None, *tokens], strict=False):
        assert rows <= seen and kept <= turn
        if policy == "full":
            assert rows == seen and kept == turn
        if previous is not None:
            assert seen > previous[1]
    if policy == "full":
        # the built-in model answers its context's questions, the later ones from the cache
        assert answers == [a for _, a in pairs]
    else:
        assert tokens[0][2] < tokens[0][3] / 4  # the prompt pruned to 20%
