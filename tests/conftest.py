"""Shared test set-up.

Hypothesis runs the same generated cases every run (``derandomize``), so a failure is
reproducible and CI does not depend on luck; ``HYPOTHESIS_PROFILE=explore`` draws new cases.

Without CUDA, Triton kernels run on CPU tensors only in Triton's interpreter, which is chosen
when a kernel is decorated: so the variable is set here, before any test imports a kernel.
"""

import contextlib
import importlib.metadata
import os

import pytest
import torch
from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("explore", print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_report_header(config):
    """The versions under test: which environment CI's log comes from, locked or newest."""
    versions = []
    for name in ("torch", "transformers", "triton", "kernels", "kvpress", "lmms_eval"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions.append(f"{name} {importlib.metadata.version(name)}")
    lock = os.environ.get("CSP_LOCK")
    return f"{', '.join(versions)} ({f'locked: {lock}' if lock else 'not from a lock'})"


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models: one thread is ~10x faster than two on a shared, busy
    machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
