"""The names the library gives its phases in ``torch.profiler`` traces, and :func:`label`.

- ``csp::scoring``: CSP's decomposed window scores (inside the prefill compaction op);
- ``csp::window_attention``: the CPU prefill's window rows, their attention and their scores
  from the same logits (``csp_inductor::window_prefill``; the scoring is then not labelled
  ``csp::scoring``);
- ``csp::selection``: a policy's ``select`` (scores -> kept indices, scoring included);
- ``csp::compaction``: the gather of the kept K/V into the cache buffers;
- ``csp::reprune``: a bounded cache pruned again;
- ``csp::prefill_attention`` / ``csp::decode_attention``: the attention kernels.

Scoring, selection and compaction run inside the ``csp_inductor::compact_`` custom op, which
executes eagerly even in a compiled graph, so their labels show up in compiled runs too. The
attention labels are visible with ``compile=False`` only: Dynamo drops ``record_function`` in a
traced region (no graph break), so :func:`label` is a no-op while compiling, and a compiled
decoder shows up as ``Torch-Compiled Region`` and its Inductor graph calls instead.
"""

from __future__ import annotations

import contextlib

import torch

PREFIX = "csp::"
SCORING = "csp::scoring"
WINDOW_ATTENTION = "csp::window_attention"
SELECTION = "csp::selection"
COMPACTION = "csp::compaction"
REPRUNE = "csp::reprune"
PREFILL_ATTENTION = "csp::prefill_attention"
DECODE_ATTENTION = "csp::decode_attention"


def label(name: str):
    """``record_function(name)`` in eager code, a no-op context while Dynamo traces."""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return torch.profiler.record_function(name)
