"""Greedy generation, compared: the same tokens and logits. :func:`greedy` itself lives in
:mod:`csp_inductor.check` (the ``check`` command generates with it) and is re-exported here."""

from __future__ import annotations

import torch
from torch import Tensor

from ..check import greedy

__all__ = ["assert_same_generation", "greedy"]


def assert_same_generation(got: tuple[Tensor, Tensor], want: tuple[Tensor, Tensor]) -> None:
    """Same tokens and logits within 1e-4 (a masking error shows even if no token flips)."""
    torch.testing.assert_close(got[1], want[1], atol=1e-4, rtol=1e-4)
    assert got[0].tolist() == want[0].tolist()
