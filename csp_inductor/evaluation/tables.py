"""The harness's results as a text table and as a plot of accuracy against the budget."""

from __future__ import annotations


def format_table(results: list[dict]) -> str:
    tasks = list(dict.fromkeys(r["task"] for r in results))
    runs = list(dict.fromkeys((r["policy"], r["budget"]) for r in results))
    cell = {(r["policy"], r["budget"], r["task"]): r["accuracy"] for r in results}
    head = f"{'policy':<28}{'budget':>7}" + "".join(f"{t:>14}" for t in tasks)
    lines = [head, "-" * len(head)]
    for policy, budget in runs:
        vals = "".join(f"{cell.get((policy, budget, t), float('nan')):>14.3f}" for t in tasks)
        lines.append(f"{policy:<28}{budget:>7.2f}{vals}")
    return "\n".join(lines)


def plot(results: list[dict], path: str) -> None:
    """Accuracy vs budget, one panel per task (and ``all``), one line per policy; ``full`` is a
    dashed horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in results))
    budgets = sorted({r["budget"] for r in results if r["policy"] != "full"})
    cols = min(3, len(tasks))
    rows_n = -(-len(tasks) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.4 * rows_n), squeeze=False)
    for ax, task in zip(axes.flat, tasks, strict=False):
        rows = [r for r in results if r["task"] == task]
        for i, policy in enumerate(dict.fromkeys(r["policy"] for r in rows)):
            pts = sorted((r["budget"], r["accuracy"]) for r in rows if r["policy"] == policy)
            if policy == "full":
                ax.axhline(pts[0][1], color="black", ls="--", lw=1, label="full cache")
            else:
                ax.plot(*zip(*pts, strict=True), marker="o", color=f"C{i}", label=policy)
        ax.set_xscale("log")
        ax.set_xticks(budgets, [f"{b:g}" for b in budgets])
        ax.minorticks_off()
        ax.set_title(task, fontsize=10)
        ax.set_xlabel("KV budget (fraction of the prompt kept)", fontsize=8)
        ax.set_ylabel("accuracy", fontsize=8)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(tasks) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower right", fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
