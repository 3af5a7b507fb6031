"""Command line: ``python -m csp_inductor {demo,chat,eval,check,profile,train,kvpress} ...``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def demo(argv: list[str]) -> int:
    """Full cache vs CSP vs SnapKV at 20% on a VisualHaystack subset, with the built-in model."""
    p = argparse.ArgumentParser(prog="python -m csp_inductor demo", description=demo.__doc__)
    p.add_argument("--samples", type=int, default=8, help="held-out prompts per task")
    p.add_argument("--budget", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument(
        "--compile", action="store_true", help="torch.compile the decoder (slower start)"
    )
    p.add_argument(
        "--tp", action="store_true", help="under torchrun: split the model (tensor parallelism)"
    )
    args = p.parse_args(argv)

    import torch

    from .distributed import ALONE, Ranks
    from .evaluation import haystack as hs
    from .evaluation.eval import PolicySpec, decode_speed, pruning, run_haystack
    from .policies import Full

    ranks = Ranks.launched()
    if args.tp and ranks.size == 1:
        p.error("--tp splits the model over the processes of a launch: torchrun --nproc-per-node N")
    # under torchrun: one model split over the processes (--tp), or the prompts shared out
    share = ALONE if args.tp else ranks
    say = print if ranks.main else lambda *a, **k: None
    torch.manual_seed(0)
    started = time.perf_counter()
    model = hs.load_builtin_model(tp_plan="auto" if args.tp else None)
    data = hs.make_split("test", args.samples * len(hs.TASKS), seed=args.seed)
    longest = max(data, key=lambda s: len(s.input_ids))
    lengths = [len(s.input_ids) for s in data]
    say(
        f"built-in tiny LLaVA, {len(data)} VisualHaystack prompts of {min(lengths)}-{max(lengths)} "
        f"tokens ({sum(int(s.is_image.sum()) for s in data) / sum(lengths):.0%} visual), "
        f"budget {args.budget:.0%}, {'compiled' if args.compile else 'eager'} backend"
        + (f", split over {ranks.size} processes" if args.tp else "")
        + (f", prompts shared by {ranks.size} processes" if share.size > 1 else "")
    )
    header = f"{'policy':<10}{'accuracy':>10}{'KV held':>12}{'of full':>9}{'decode tok/s':>14}"
    say(header, "-" * len(header), sep="\n")
    with pruning(model, Full(), compile=args.compile):  # one backend for the three policies
        for name in ("full", "csp", "snapkv"):
            policy = PolicySpec(name).build(args.budget)
            stats = run_haystack(model, data, policy, ranks=share)
            speed, held = decode_speed(model, longest, policy)
            accuracy = sum(stats.correct) / len(data)
            fraction = stats.kv_bytes / stats.full_kv_bytes
            row = f"{name:<10}{accuracy:>10.1%}{held / 2**10:>9.0f} KiB{fraction:>9.1%}"
            say(f"{row}{speed:>14.0f}")
    say(
        f"(KV held: the cache of the longest prompt, {len(longest.input_ids)} tokens, with room "
        f"for 32 new ones{', on one process' if args.tp else ''}; 'of full': over all "
        f"prompts.) {time.perf_counter() - started:.0f} s"
    )
    return 0


def _profile_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m csp_inductor profile",
        description="Profile generate on a random-weight long-context LLaVA: Chrome trace + "
        "key-averages table, with csp:: phase totals.",
    )
    p.add_argument("--context", type=int, default=4096, help="prompt tokens (default 4096)")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens to generate (default 16)")
    p.add_argument("--policy", default="csp", help="csp | snapkv | h2o | ... | none (unmodified)")
    p.add_argument("--budget", type=float, default=0.2, help="kept fraction (default 0.2)")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--kernel", default="auto", choices=("auto", "sdpa", "flex"))
    p.add_argument("--eager", action="store_true", help="no torch.compile (attention labels)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--out", default="profile_out", help="directory for trace/table/summary")
    p.add_argument("--sort-by", default="cpu_time_total", help="key-averages sort column")
    p.add_argument("--row-limit", type=int, default=30)
    p.add_argument("--record-shapes", action="store_true")
    p.add_argument("--profile-memory", action="store_true")
    return p


def profile(argv: list[str]) -> int:
    """``python -m csp_inductor profile``: ``generate`` on a random-weight long-context LLaVA
    (:func:`~csp_inductor.testing.long_context_llava`, an image-heavy prompt) under
    :func:`~csp_inductor.profiling.profiled`; writes the Chrome trace, the key-averages table
    and a JSON summary to ``--out``. Returns a process exit code."""
    args = _profile_parser().parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import csp_inductor

    from .policies import make_policy
    from .profiling import profiled
    from .testing.long_context import image_heavy_prompt, long_context_llava

    model = long_context_llava(args.hidden, args.layers, args.heads, args.kv_heads)
    inputs = image_heavy_prompt(model, args.context)
    gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    summary: dict = {"args": vars(args)}
    if args.policy != "none":
        options = {} if args.policy == "full" else {"budget": args.budget}
        policy = make_policy(args.policy, **options)
        csp_inductor.compile(model, policy, kernel=args.kernel, compile=not args.eager)
        # compile (or warm up) on a short prompt outside the profiled region
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(**image_heavy_prompt(model, min(args.context, 2048), seed=1), **gen)
        summary["warmup_s"] = time.perf_counter() - start
    with torch.inference_mode(), profiled(
        args.out, name=f"{args.policy}_{args.context}", sort_by=args.sort_by,
        row_limit=args.row_limit, record_shapes=args.record_shapes,
        profile_memory=args.profile_memory,
    ) as prof:  # fmt: skip
        model.generate(**inputs, **gen)
    summary.update(wall_s=prof.seconds, phase_ms=prof.phase_ms, trace=str(prof.trace))
    backend = getattr(model, "csp_backend", None)
    if backend is not None:
        summary["kv_bytes"] = backend.cache.nbytes()
        summary["kept_prompt"] = backend.cache.kept_prompt
    print(prof.table)
    print(json.dumps(summary, indent=1, default=str))
    (Path(args.out) / f"{args.policy}_{args.context}.summary.json").write_text(
        json.dumps(summary, indent=1, default=str) + "\n"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = ("demo", "chat", "eval", "check", "profile", "train", "kvpress")
    if not argv or argv[0] not in commands:
        print(f"usage: python -m csp_inductor {{{','.join(commands)}}} [options]", file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    if command == "demo":
        return demo(rest)
    if command == "chat":
        from .chat import main as chat_main

        return chat_main(rest)
    if command == "eval":
        from .evaluation.eval import main as eval_main

        return eval_main(rest)
    if command == "check":
        from .check import main as check_main

        return check_main(rest)
    if command == "profile":
        return profile(rest)
    if command == "kvpress":  # (needs kvpress: make test-compat sets up its environment)
        from .integrations.kvpress import compare

        return compare(rest)
    from .evaluation.train import main as train_main

    train_main(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
