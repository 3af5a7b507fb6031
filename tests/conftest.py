"""Shared test set-up.

Without CUDA, Triton kernels run on CPU tensors only in Triton's interpreter, which is chosen
when a kernel is decorated: so the variable is set here, before any test imports a kernel.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
