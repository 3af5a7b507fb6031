"""Plots and the results table from the pytest-benchmark JSON files in ``bench/results/``.

    python bench/plots.py [--results bench/results]

Writes ``decode_latency.png`` (decode-step attention latency vs context, per policy),
``kv_memory.png`` (KV bytes held vs context, per policy, for the long-context model) and
``scoring.png`` (time and peak memory, fused vs dense), ``bounded_cache.png`` (cache bytes
and held tokens over a long generation, with and without ``max_cache_tokens``), and prints a
markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _load(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return json.loads(path.read_text())["benchmarks"]


def decode_rows(benches: list[dict]) -> list[dict]:
    """One row per (context, budget): interleaved medians of full and csp, and their ratio."""
    rows = []
    for b in benches:
        e = b["extra_info"]
        if not str(e.get("provider", "")).startswith("csp"):
            continue
        rows.append({
            "context": e["shapes"]["context"], "budget": e["budget"],
            "full_ms": e["interleaved_s"]["sdpa_full"] * 1e3,
            "csp_ms": e["interleaved_s"]["csp"] * 1e3, "speedup": e["speedup_vs_full"],
            "kv_bytes": e["kv_bytes"], "kv_bytes_full": e["kv_bytes_full"],
        })  # fmt: skip
    return sorted(rows, key=lambda r: (r["budget"], r["context"]))


def scoring_rows(benches: list[dict], peaks: dict | None = None) -> list[dict]:
    """``peaks`` ("provider-seq" -> bytes, from ``python bench/bench_scoring.py``) replaces the
    peak RSS recorded in the benchmark rows when given."""
    rows = []
    for b in benches:
        e = b["extra_info"]
        key = f"{e['provider']}-{e['shapes']['seq']}"
        peak = (peaks or {}).get(key, e.get("peak_rss_bytes"))
        rows.append({
            "seq": e["shapes"]["seq"], "provider": e["provider"],
            "median_s": b["stats"]["median"], "peak_rss": peak,
            "speedup": e.get("speedup_vs_dense"), "mem_ratio": None,
        })  # fmt: skip
    by_key = {(r["provider"], r["seq"]): r for r in rows}
    for r in rows:
        dense = by_key.get(("dense", r["seq"]))
        if r["provider"] == "fused" and dense and dense["peak_rss"] and r["peak_rss"]:
            r["mem_ratio"] = dense["peak_rss"] / r["peak_rss"]
    return sorted(rows, key=lambda r: (r["seq"], r["provider"]))


def _peaks(results: Path) -> dict | None:
    path = results / "scoring_peak_rss.json"
    return json.loads(path.read_text())["peak_rss_bytes"] if path.exists() else None


def plot_decode(rows: list[dict], out: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    budgets = sorted({r["budget"] for r in rows})
    for i, budget in enumerate(budgets):
        sel = [r for r in rows if r["budget"] == budget]
        ctx = [r["context"] for r in sel]
        if i == 0:
            ax.plot(ctx, [r["full_ms"] for r in sel], "o-", label="full-cache SDPA")
        ax.plot(ctx, [r["csp_ms"] for r in sel], "s-", label=f"CSP budget {budget}")
    ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="ms per decode step",
           title="Decode-step attention, one layer (16q/4kv heads, d=64)")  # fmt: skip
    ax.set_xticks([r["context"] for r in rows if r["budget"] == budgets[0]])
    ax.xaxis.set_major_formatter(plt.ScalarFormatter())
    ax.xaxis.set_minor_formatter(plt.NullFormatter())
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_kv(generate: list[dict], out: Path, budgets=(0.1, 0.2), new_tokens: int = 64) -> None:
    """KV bytes vs context for the long-context model: full cache = (L + new) tokens; CSP = the
    policy's kept count + decode capacity (the cache's exact formula); measured points from
    ``generate.json`` on top."""
    import matplotlib.pyplot as plt

    sys.path.insert(0, str(HERE.parent))
    from csp_inductor import CSP

    per_token = 2 * 8 * 4 * 64 * 4  # layers x (K, V) x kv_heads x head_dim x fp32
    contexts = [2048, 4096, 8192, 16384, 32768, 65536]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(contexts, [(c + new_tokens) * per_token / 2**20 for c in contexts], "o-",
            label="full cache")  # fmt: skip
    for budget in budgets:
        kept = [CSP(budget=budget).budget_for(c).kept for c in contexts]
        ax.plot(contexts, [(k + new_tokens) * per_token / 2**20 for k in kept], "s-",
                label=f"CSP budget {budget}")  # fmt: skip
    for b in generate:
        e = b["extra_info"]
        ax.plot(e["context"], e["kv_bytes"] / 2**20, "kx", markersize=10)
    ax.plot([], [], "kx", label="measured (generate)")
    ax.set(xscale="log", yscale="log", xlabel="context (tokens)", ylabel="KV MiB held",
           title="KV cache, 8 layers x 4 kv heads x d=64, fp32")  # fmt: skip
    ax.xaxis.set_minor_formatter(plt.NullFormatter())
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_scoring(rows: list[dict], out: Path) -> None:
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(9, 3.6))
    for provider, marker in (("fused", "s-"), ("dense", "o-")):
        sel = [r for r in rows if r["provider"] == provider]
        seqs = [r["seq"] for r in sel]
        ax_t.plot(seqs, [r["median_s"] for r in sel], marker, label=provider)
        mem = [(r["seq"], r["peak_rss"] / 2**20) for r in sel if r["peak_rss"]]
        if mem:
            ax_m.plot(*zip(*mem, strict=True), marker, label=provider)
    ax_t.set(xscale="log", yscale="log", xlabel="L", ylabel="s", title="scoring time")
    ax_m.set(xscale="log", yscale="log", xlabel="L", ylabel="MiB", title="peak RSS growth")
    for ax in (ax_t, ax_m):
        ax.legend()
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_bounded(benches: list[dict], out: Path) -> None:
    """Buffer bytes and held tokens per generated token, bounded vs unbounded (one figure)."""
    import matplotlib.pyplot as plt

    runs = [b["extra_info"] for b in benches if b["extra_info"].get("provider") == "csp_bounded"]
    if not runs:
        return
    info = runs[-1]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for name, run in info["providers"].items():
        steps, nbytes, held = zip(*run["series_every_10"], strict=True)
        top.plot(steps, [n / 2**20 for n in nbytes], label=name)
        bottom.plot(steps, held, label=name)
    top.set_ylabel("cache buffers (MiB)")
    bottom.set_ylabel("tokens held")
    bottom.set_xlabel("generated tokens")
    shapes = info["shapes"]
    top.set_title(
        f"CSP 0.2, {shapes['prompt']}-token prompt, max_cache_tokens={shapes['bound']} vs none"
    )
    top.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_stream(benches: list[dict], out: Path) -> None:
    """Peak memory and prefill time per prompt token against the prompt's length: the stream
    (hard cap) and the whole-prompt providers as far as they ran (one figure)."""
    import matplotlib.pyplot as plt

    runs = [b["extra_info"] for b in benches if b["extra_info"].get("provider") == "stream"]
    if not runs:
        return
    info = runs[-1]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for name, by_context in info["providers"].items():
        contexts = sorted(int(c) for c in by_context)
        rows = [by_context[str(c)] for c in contexts]
        top.plot(contexts, [r["peak_growth"] / 2**20 for r in rows], marker="o", label=name)
        bottom.plot(contexts, [r["ms_per_token"] for r in rows], marker="o", label=name)
    top.set_ylabel("prefill's peak RSS growth (MiB)")
    bottom.set_ylabel("prefill ms per prompt token")
    bottom.set_xlabel("prompt tokens")
    bottom.set_xscale("log", base=2)
    shapes = info["shapes"]
    top.set_title(
        f"CSP {shapes['budget']}: streamed (cap {shapes['bound']}, chunk {shapes['chunk']}) "
        "vs whole prompts",
        fontsize=10,
    )
    top.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def table(results: Path) -> str:
    lines = []
    dec = decode_rows(_load(results / "decode.json"))
    if dec:
        lines += ["| context | budget | full SDPA ms | CSP ms | speed-up | KV MiB full → CSP |",
                  "|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for r in dec:
            lines.append(
                f"| {r['context']} | {r['budget']} | {r['full_ms']:.2f} | {r['csp_ms']:.2f} | "
                f"{r['speedup']:.1f}× | {r['kv_bytes_full'] / 2**20:.1f} → "
                f"{r['kv_bytes'] / 2**20:.1f} |"
            )
        lines.append("")
    sc = scoring_rows(_load(results / "scoring.json"), _peaks(results))
    if sc:
        lines += ["| L | provider | median s | peak RSS MiB | speed-up | memory ratio |",
                  "|---:|---|---:|---:|---:|---:|"]  # fmt: skip
        for r in sc:
            peak = "–" if r["peak_rss"] is None else f"{r['peak_rss'] / 2**20:.0f}"
            speed = "" if r["speedup"] is None else f"{r['speedup']:.1f}×"
            mem = "" if r["mem_ratio"] is None else f"{r['mem_ratio']:.0f}×"
            lines.append(
                f"| {r['seq']} | {r['provider']} | {r['median_s']:.3f} | {peak} | {speed} | {mem} |"
            )
        lines.append("")
    gen = _load(results / "generate.json")
    if gen:
        lines += [
            "| provider | context | prefill s | decode tok/s | KV MiB | peak RSS MiB | "
            "held RSS MiB | compile s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for b in gen:
            e = b["extra_info"]
            lines.append(
                f"| {e['provider']} | {e['context']} | {e['prefill_s']:.1f} | "
                f"{e['decode_tok_s']:.2f} | {e['kv_bytes'] / 2**20:.1f} | "
                f"{e['peak_rss_growth'] / 2**20:.0f} | {e['held_rss_growth'] / 2**20:.0f} | "
                f"{e['compile_s']:.0f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    dec = decode_rows(_load(args.results / "decode.json"))
    if dec:
        plot_decode(dec, args.results / "decode_latency.png")
    plot_kv(_load(args.results / "generate.json"), args.results / "kv_memory.png")
    sc = scoring_rows(_load(args.results / "scoring.json"), _peaks(args.results))
    if sc:
        plot_scoring(sc, args.results / "scoring.png")
    plot_bounded(_load(args.results / "conversation.json"), args.results / "bounded_cache.png")
    plot_stream(_load(args.results / "stream.json"), args.results / "stream.png")
    print(table(args.results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
