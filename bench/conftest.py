"""Shared benchmark helpers: sizes from the environment, machine/version info, interleaved
side-by-side timing, and peak-RSS measurement in a fresh subprocess.

Every benchmark records in ``benchmark.extra_info``: ``machine`` (platform, CPU, cores, torch
threads, load average at the start), ``versions``, ``shapes`` and derived figures (ratios,
tokens/s, bytes of KV). Ratios come from :func:`interleaved`, which alternates the providers
round by round in the same process so a noisy shared machine slows them alike; the
pytest-benchmark timing of each provider is recorded as well.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

BENCH_DIR = Path(__file__).parent
ROOT = BENCH_DIR.parent
# Intra-op threads. The default 1 keeps timings stable on a shared 2-core machine, where a
# parallel region waits for a descheduled sibling thread (a ~16 ms scheduler quantum).
THREADS = int(os.environ.get("CSP_BENCH_THREADS", "1"))
torch.set_num_threads(THREADS)


def env_ints(name: str, default: str) -> list[int]:
    """A comma-separated list of ints from the environment (e.g. CSP_BENCH_CONTEXTS=4096,8192)."""
    return [int(x) for x in os.environ.get(name, default).split(",") if x.strip()]


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def env_floats(name: str, default: str) -> list[float]:
    return [float(x) for x in os.environ.get(name, default).split(",") if x.strip()]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()),
        "mem_available_gib": round(mem_available() / 2**30, 1),
    }


def versions() -> dict:
    import transformers

    found = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        found["kvpress"] = importlib.metadata.version("kvpress")  # a peer (make bench-peers)
    return found


def mem_available() -> int:
    """Bytes of MemAvailable (Linux), or a large number when unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 50


def record(benchmark, **info) -> None:
    """Machine, versions and ``info`` into ``benchmark.extra_info``."""
    benchmark.extra_info.update(machine=machine(), versions=versions(), **info)


def read_bandwidth(mib: int = 512, repeats: int = 5) -> float:
    """Bytes per second this process reads: a sum over a ``mib`` MiB fp32 tensor, best of
    ``repeats`` (the first touch excluded)."""
    x = torch.ones(mib * 2**20 // 4)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.nbytes / best


def step_weight_bytes(model) -> int:
    """What a decode step of :func:`csp_inductor.testing.long_context_llava` reads of the
    weights: the text decoder and the LM head, one row of the embedding table (the vision tower
    is not run)."""
    text = model.model.language_model
    embed = text.get_input_embeddings().weight
    decoder = sum(p.nbytes for n, p in text.named_parameters() if not n.startswith("embed"))
    return decoder + model.lm_head.weight.nbytes + embed[0].nbytes


class TokenClock:
    """A logits processor that timestamps every generation step (the first = after prefill)."""

    def __init__(self):
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores):
        self.stamps.append(time.perf_counter())
        return scores


def interleaved(providers: dict[str, Callable[[], object]], rounds: int, warmup: int = 2):
    """Median seconds per provider, the providers alternated round by round (ABAB…), and the
    median of the per-round ratios to the first provider (robust to load drifting)."""
    for _ in range(warmup):
        for fn in providers.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in providers}
    for _ in range(rounds):
        for name, fn in providers.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    first = next(iter(providers))
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    ratios = {
        name: statistics.median(a / b for a, b in zip(times[first], ts, strict=True))
        for name, ts in times.items()
    }
    return medians, ratios


def peak_rss_growth(setup: str, run: str, timeout: float = 1800.0) -> int | None:
    """Peak RSS growth in bytes of ``run`` in a fresh Python process.

    ``setup`` (imports and input allocation) runs first; then the baseline peak RSS
    (``VmHWM``) is read, ``run`` executes once, and the growth of the peak is returned.
    None when the child fails (e.g. out of memory).
    """
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over execve, so a child of a big parent
    # (pytest after a dense run) would start at the parent's high-water mark.
    code = textwrap.dedent(setup) + textwrap.dedent(
        f"""
        import gc, json
        def _hwm():
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM"):
                    return int(line.split()[1]) * 1024
        gc.collect()
        try:  # reset the high-water mark to the current RSS (setup's temporaries are gone)
            with open("/proc/self/clear_refs", "w") as _f:
                _f.write("5")
        except OSError:
            pass
        _base = _hwm()
        {run}
        print("PEAK_RSS_JSON", json.dumps(_hwm() - _base))
        """
    )
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env
    )
    for line in proc.stdout.splitlines():
        if line.startswith("PEAK_RSS_JSON"):
            return int(json.loads(line.split(" ", 1)[1]))
    sys.stderr.write(proc.stderr[-2000:])
    return None


@pytest.fixture(autouse=True)
def _inference_mode():
    with torch.inference_mode():
        yield


def pytest_collect_file(file_path, parent):
    # suites are bench_*.py; bench_kernels_gpu.py is a stand-alone script, not a suite
    if parent.session.isinitpath(file_path):
        return None  # given on the command line: the python plugin collects it
    if (
        file_path.suffix == ".py"
        and file_path.name.startswith("bench_")
        and file_path.name != "bench_kernels_gpu.py"
    ):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
