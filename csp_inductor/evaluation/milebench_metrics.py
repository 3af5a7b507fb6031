"""MileBench's scoring of one dataset's predictions.

Scoring follows MileBench's ``evaluate.py``: answers are normalized (punctuation, case), multiple
choice is accuracy after extracting an option letter (letter+text, then text, then a bare letter,
then every option letter in the answer), open-ended datasets use ROUGE-L F, the needle datasets
token or substring containment. Known, documented differences: ROUGE-L here is the plain
sentence-level LCS F1 over tokens (the ``rouge`` package MileBench calls counts distinct tokens,
so scores differ when words repeat).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from csp_inductor.evaluation.milebench import MileSample

# Datasets MileBench scores with ROUGE-L. Their files say "open-ended" in meta_data.question_type,
# except ALFRED whose question_type is empty, hence a table by name as the fallback.
OPEN_ENDED_DATASETS = frozenset({"ALFRED", "CLEVR-Change", "IEdit", "Spot-the-Diff"})
# evaluate.py routes these by name before looking at question_type.
NEEDLE_TOKEN_DATASETS = ("NeedleInAHaystack",)  # answer must be one whitespace token of the output
NEEDLE_SUBSTRING_DATASETS = ("MMCoQA",)  # answer must be a substring of the output
# MileBench's match_choice returns "C" for an empty answer; kept so scores stay comparable.
EMPTY_ANSWER_CHOICE = "C"


_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@",
          "`", ",", "?", "!")  # fmt: skip
_COMMA_NUMBER = re.compile(r"(\d)(,)(\d)")
# MileBench's pattern "(?!<=\d)(\.)(?!\d)" behaves as this one: its first group is a lookahead
# for the literal "<=", which never matches at a period. (They also cap it at 32 removals by
# passing re.UNICODE as `count`; we remove all.)
_PERIOD = re.compile(r"\.(?!\d)")


def normalize_answer(text: str) -> str:
    """MileBench's answer normalization: one line, punctuation removed or spaced, lower case."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    drop = _COMMA_NUMBER.search(text) is not None
    for p in _PUNCT:
        # punctuation next to a space is dropped, inside a word it becomes a space
        out = out.replace(p, "" if drop or p + " " in text or " " + p in text else " ")
    out = _PERIOD.sub("", out)
    return out.strip("'").strip('"').strip().lower()


def match_choice(prediction: str, choices: Sequence[str]) -> str:
    """The option letter MileBench reads from ``prediction`` ("A", "B", ...).

    In order: letter followed by option text ("B blue square", after normalization, anywhere);
    option text (spaces ignored; leftmost match); the whole answer being one option letter;
    otherwise every character of the answer that is an option letter, concatenated (so
    "the answer is b" gives "AB" and counts as wrong, as in MileBench). Empty gives "C".
    """
    text = normalize_answer(prediction)
    options = {chr(65 + i): normalize_answer(c) for i, c in enumerate(choices)}
    if text == "":
        return EMPTY_ANSWER_CHOICE
    with_letter = [normalize_answer(f"{k} {v}") for k, v in options.items()]
    m = re.search("|".join(re.escape(o) for o in with_letter), text, re.S)
    if m:
        return m.group(0)[0].upper()
    squeezed = {k: v.replace(" ", "") for k, v in options.items() if v.replace(" ", "")}
    if squeezed:
        m = re.search("|".join(re.escape(v) for v in squeezed.values()), text.replace(" ", ""))
        if m:
            return next(k for k, v in squeezed.items() if v == m.group(0))
    if len(text) == 1 and text.upper() in options:
        return text.upper()
    return "".join(c.upper() for c in text if c.upper() in options)


def multiple_choice_correct(prediction: str, response: str, choices: Sequence[str]) -> bool:
    """Whether the extracted letter is the letter of ``response`` in ``choices``."""
    normalized = [normalize_answer(c) for c in choices]
    gt = normalize_answer(response)
    if gt not in normalized:
        raise ValueError(f"response {response!r} is not one of the choices {list(choices)}")
    return match_choice(prediction, choices) == chr(65 + normalized.index(gt))


def rouge_l(prediction: str, reference: str, *, normalize: bool = True) -> float:
    """ROUGE-L F1 = 2PR/(P+R), P = LCS/len(pred), R = LCS/len(ref), over whitespace tokens
    (after :func:`normalize_answer` when ``normalize``). 0.0 if either side is empty."""
    if normalize:
        prediction, reference = normalize_answer(prediction), normalize_answer(reference)
    hyp, ref = prediction.split(), reference.split()
    if not hyp or not ref:
        return 0.0
    prev = [0] * (len(ref) + 1)
    for h in hyp:
        cur = [0]
        for j, r in enumerate(ref):
            cur.append(prev[j] + 1 if h == r else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(hyp), lcs / len(ref)
    return 2 * p * r / (p + r)


def metric_for(dataset_name: str, question_type: str = "", *, has_choices: bool = False) -> str:
    """How MileBench scores a dataset: ``"choice"`` (multiple-choice accuracy), ``"rouge_l"``,
    ``"needle_token"`` or ``"needle_substring"`` (containment accuracy)."""
    if any(n in dataset_name for n in NEEDLE_TOKEN_DATASETS):
        return "needle_token"
    if any(n in dataset_name for n in NEEDLE_SUBSTRING_DATASETS):
        return "needle_substring"
    if question_type == "open-ended":
        return "rouge_l"
    if question_type == "multi-choice":
        return "choice"
    if dataset_name in OPEN_ENDED_DATASETS:
        return "rouge_l"
    if has_choices:
        return "choice"
    raise ValueError(
        f"cannot tell how to score dataset {dataset_name!r}: question_type={question_type!r} "
        "(expected 'multi-choice' or 'open-ended'), not a known open-ended dataset, no choices"
    )


def _sample_score(metric: str, prediction: str, sample: MileSample) -> float:
    if metric == "choice":
        if not sample.choices:
            raise ValueError(f"{sample.dataset} sample {sample.sample_id!r} has no choice_list")
        return float(multiple_choice_correct(prediction, sample.response, sample.choices))
    if metric == "rouge_l":
        return rouge_l(prediction, sample.response)
    gt, pred = normalize_answer(sample.response), normalize_answer(prediction)
    return float(gt in pred.split() if metric == "needle_token" else gt in pred)


def score(
    dataset_name: str, predictions: Sequence[str], samples: Sequence[MileSample]
) -> dict[str, Any]:
    """Score one dataset's predictions (same order as ``samples``).

    Returns ``{"dataset", "metric": "accuracy" | "rouge_l", "matcher": see metric_for, "score"
    (mean in [0, 1]), "n", "per_sample": [{"sample_id", "score"}], "by_image_quantity_level"}``.
    """
    if len(predictions) != len(samples):
        raise ValueError(f"{len(predictions)} predictions for {len(samples)} samples")
    if not samples:
        raise ValueError(f"no samples to score for {dataset_name!r}")
    others = {s.dataset for s in samples} - {dataset_name}
    if others:
        raise ValueError(f"samples from {sorted(others)} passed to score({dataset_name!r}, ...)")
    matcher = metric_for(
        dataset_name, samples[0].question_type, has_choices=samples[0].choices is not None
    )
    per = [_sample_score(matcher, p, s) for p, s in zip(predictions, samples, strict=True)]
    levels: dict[str, list[float]] = {}
    for s, v in zip(samples, per, strict=True):
        if s.image_quantity_level is not None:
            levels.setdefault(s.image_quantity_level, []).append(v)
    return {
        "dataset": dataset_name,
        "metric": "rouge_l" if matcher == "rouge_l" else "accuracy",
        "matcher": matcher,
        "score": sum(per) / len(per),
        "n": len(per),
        "per_sample": [
            {"sample_id": s.sample_id, "score": v} for s, v in zip(samples, per, strict=True)
        ],
        "by_image_quantity_level": {k: sum(v) / len(v) for k, v in levels.items()},
    }
