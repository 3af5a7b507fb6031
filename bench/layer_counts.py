"""Each layer's kept count under every ``layers=`` rule, on one VisualHaystack prompt of the
built-in model: a JSON of the counts and a plot (one panel per budget).

    python bench/layer_counts.py [--out bench/results/layer_counts]

CSP scored by its window (the question at the prompt's end) and by the re-read (question-
agnostic), at 5% and 10%; the prompt is the first comparison prompt of the test split, seed
1234 (what ``eval --seed 1234`` scores first).
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import torch

import csp_inductor
from csp_inductor import CSP
from csp_inductor.evaluation import haystack as hs
from csp_inductor.evaluation.builtin_model import collate, load_builtin_model

HERE = Path(__file__).resolve().parent
RULES = ("uniform", "pyramid", "adaptive")
SCORINGS = {"window": {}, "reconstruct": {"scoring": "reconstruct"}}


def counts(model, batch: dict, budget: float, scoring: str, rule: str) -> list[int]:
    """The prompt's kept tokens in each layer."""
    window = min(0.1, budget / 2) if scoring == "window" else min(0.01, budget / 2)
    policy = CSP(budget=budget, window_ratio=window, layers=rule, **SCORINGS[scoring])
    csp_inductor.compile(model, policy, compile=False)
    try:
        with torch.no_grad():
            model(**batch)
        cache = model.csp_backend.cache
        return [int(layer.lengths[0]) for layer in cache.pruned]
    finally:
        csp_inductor.restore(model)


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["scoring"], r["budget"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2), sharey=True)
    for ax, (scoring, budget) in zip(axes, panels, strict=True):
        for i, rule in enumerate(RULES):
            row = next(
                r for r in rows
                if (r["scoring"], r["budget"], r["layers"]) == (scoring, budget, rule)
            )  # fmt: skip
            layers = range(len(row["counts"]))
            ax.bar([x + (i - 1) * 0.27 for x in layers], row["counts"], width=0.27, label=rule)
        ax.set_title(f"{scoring}, {budget:.0%}", fontsize=9)
        ax.set_xlabel("layer")
    axes[0].set_ylabel("kept prompt tokens")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=HERE / "results" / "layer_counts")
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")  # (CSP's text-only notice has no place here)
    model = load_builtin_model()
    sample = hs.make_split("test", 1, seed=1234, tasks=("comparison",))[0]
    batch = collate([sample])
    rows = [
        {"scoring": scoring, "budget": budget, "layers": rule,
         "counts": counts(model, batch, budget, scoring, rule)}
        for scoring in SCORINGS for budget in (0.05, 0.1) for rule in RULES
    ]  # fmt: skip
    length = int(batch["input_ids"].shape[1])
    args.out.with_suffix(".json").write_text(
        json.dumps({"prompt_tokens": length, "rows": rows}, indent=1) + "\n"
    )
    plot(rows, args.out.with_suffix(".png"))
    for row in rows:
        print(row["scoring"], row["budget"], row["layers"], row["counts"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
