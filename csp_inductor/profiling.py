"""Profiling: ``torch.profiler`` around a run, with the library's phases labelled
(:mod:`csp_inductor.labels` names them).

``python -m csp_inductor profile [options]`` (:func:`csp_inductor.__main__.profile`) profiles
``generate`` on a random-weight long-context LLaVA
(:func:`csp_inductor.testing.long_context_llava`) with :func:`profiled` and writes a Chrome
trace plus a key-averages table.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .labels import PREFIX


@dataclass
class Profile:
    """What :func:`profiled` leaves behind once its block has run."""

    profiler: torch.profiler.profile | None = None
    trace: Path | None = None
    table: str = ""
    seconds: float = 0.0
    phase_ms: dict[str, float] = field(default_factory=dict)


def phase_times(profiler: torch.profiler.profile) -> dict[str, float]:
    """Total CPU milliseconds of every ``csp::`` label (all calls, all layers)."""
    out: dict[str, float] = {}
    for event in profiler.key_averages():
        if event.key.startswith(PREFIX):
            out[event.key] = event.cpu_time_total / 1e3
    return out


@contextlib.contextmanager
def profiled(
    out_dir: str | Path | None = None,
    *,
    name: str = "csp",
    sort_by: str = "cpu_time_total",
    row_limit: int = 30,
    record_shapes: bool = False,
    profile_memory: bool = False,
) -> Iterator[Profile]:
    """Run the block under ``torch.profiler`` (CPU activities; CUDA too when available).

    On exit fills the yielded :class:`Profile`: the key-averages table (sorted by ``sort_by``),
    the wall time, the ``csp::`` phase totals, and, when ``out_dir`` is given, writes
    ``<name>.trace.json`` (open in chrome://tracing or Perfetto) and ``<name>.table.txt`` there.
    """
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    result = Profile()
    prof = torch.profiler.profile(
        activities=activities, record_shapes=record_shapes, profile_memory=profile_memory
    )
    start = time.perf_counter()
    with prof:
        yield result
    result.seconds = time.perf_counter() - start
    result.profiler = prof
    result.table = prof.key_averages().table(sort_by=sort_by, row_limit=row_limit)
    result.phase_ms = phase_times(prof)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        result.trace = out / f"{name}.trace.json"
        prof.export_chrome_trace(str(result.trace))
        (out / f"{name}.table.txt").write_text(result.table + "\n")
