"""The LM head of decode steps as one compiled reduction: :class:`CompiledHead`."""

from __future__ import annotations

import torch
from torch import nn

from ..compiled import Compiled

# The most rows (tokens of a step, over the batch) for which the LM head streams its weight as
# one fused multiply-and-sum, by weight dtype; past them the reduction re-reads the weight per
# row and a matrix product is faster. Measured on a 32000 x 1024 head (bench/README.md).
HEAD_REDUCTION_ROWS = {torch.float32: 4, torch.bfloat16: 2}


def _head_reduction(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    if not torch.compiler.is_compiling():  # (Dynamo disabled: never the (rows, V, H) product)
        return torch.nn.functional.linear(hidden, weight, bias)
    logits = (hidden[..., None, :] * weight).sum(dim=-1)
    return logits if bias is None else logits + bias


class CompiledHead(Compiled):
    """The LM head of a decode step as one compiled reduction over its weight.

    A decode step multiplies a hidden state per row by the (vocab, hidden) weight: a
    matrix-vector product that streams the largest matrix of the model once. MKL's GEMV reads
    such a weight, larger than the last-level cache, at half the machine's read bandwidth;
    Inductor's fused multiply-and-sum streams it at about the read bandwidth (bench/README.md).
    Used for a plain ``nn.Linear`` with a CPU weight (a plain tensor: not split by a TP plan)
    of a dtype in :data:`HEAD_REDUCTION_ROWS`, at most that many rows and no autocast; anything
    else, and every call after a compiler failure (one warning), runs the module's own forward.
    """

    then = "it runs its own forward from now on, with the same results."

    def __init__(self, head: nn.Linear):
        super().__init__(_head_reduction, "the LM head")
        self.head = head
        self.eager = head.forward
        self.make()

    def __call__(self, input: torch.Tensor) -> torch.Tensor:  # (nn.Linear.forward's name)
        weight = self.head.weight
        rows = input.numel() // max(1, input.shape[-1])
        if (
            weight.device.type != "cpu" or type(weight.data) is not torch.Tensor
            or input.dtype != weight.dtype or rows > HEAD_REDUCTION_ROWS.get(weight.dtype, 0)
            or torch.is_autocast_enabled("cpu")
        ):  # fmt: skip
            return self.eager(input)
        # a fresh 2D copy (a few rows): the prompt's last token (a slice, at an offset into its
        # storage) and a step's hidden states share one graph
        flat = input.reshape(rows, input.shape[-1]).clone()
        logits = self.run((flat, weight, self.head.bias), {}, lambda: self.eager(flat))
        return logits.view(*input.shape[:-1], -1)
