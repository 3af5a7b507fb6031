"""More than one process: transformers' tensor parallelism, and data-parallel evaluation.

**Tensor parallelism.** Under a transformers TP plan (``from_pretrained(..., tp_plan="auto")``
under ``torchrun``) ``q_proj``/``k_proj``/``v_proj`` are column-sharded DTensors: rank ``r`` of
``n`` computes a contiguous block of ``1/n`` of the query heads and of the KV heads, and its
attention function receives only those, as plain tensors, while the config and the modules'
``out_features`` still give the totals. The backend therefore sizes each rank's cache for the
rank's heads (:func:`head_shards`). Scoring, selection and compaction run per KV head with a
count that depends only on the sequence (the same on every rank), and a GQA group's query heads
are on the rank of their KV head, so no policy of this package communicates: every rank keeps,
for its heads, what one process keeps for them. (A policy ranking tokens jointly across heads
would have to ``all_gather`` its scores over the TP group first; none does. ``RandomKeep`` draws
from one seeded stream per rank, so its random tokens differ from one process's.)

:func:`check_layout` refuses what the backend does not support, at ``compile``: pipeline stages,
sequence parallelism, FSDP, expert parallelism, heads that do not split evenly over the ranks,
fused QKV projections and multi-head latent attention under TP.

**Data-parallel evaluation.** :class:`Ranks` deals work items to the processes of a
``torchrun`` launch and gathers per-item results on every rank.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

# projections whose output rows are heads, and the plan styles that shard them by heads
HEAD_PROJECTIONS = ("q_proj", "k_proj", "v_proj")
UNSUPPORTED_STYLES = ("sequence", "packed")


def head_shards(attn: nn.Module) -> int:
    """Over how many ranks ``attn``'s heads are split: the mesh size of its column-sharded
    (``Shard(0)``) projection weights, 1 when they are whole. Raises when the projections
    disagree or are sharded another way."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    shards = {}
    for name in HEAD_PROJECTIONS:
        weight = getattr(getattr(attn, name, None), "weight", None)
        placements = tuple(weight.placements) if isinstance(weight, DTensor) else ()
        if all(isinstance(p, Replicate) for p in placements):
            shards[name] = 1
        elif placements == (Shard(0),):
            shards[name] = weight.device_mesh.size()
        else:
            raise ValueError(
                f"csp_inductor supports attention projections split by heads (Shard(0) over a "
                f"1-D mesh) or whole; {name}.weight has placements={placements}"
            )
    if len(set(shards.values())) > 1:
        raise ValueError(
            f"csp_inductor needs q_proj, k_proj and v_proj split over the same ranks, got {shards}"
        )
    return shards["q_proj"]


def tp_loading(plan: str | dict = "auto") -> dict:
    """``from_pretrained``'s arguments for tensor parallelism by ``plan``: a
    ``DistributedConfig`` (transformers >= 5.3), or ``tp_plan`` itself (earlier)."""
    from transformers.distributed import DistributedConfig

    if "tp_plan" in DistributedConfig.__dataclass_fields__:
        return {"distributed_config": DistributedConfig(tp_plan=plan)}
    return {"tp_plan": plan}


def check_layout(model: nn.Module, attention_layers: Sequence[nn.Module]) -> None:
    """Raise a ValueError naming the layout when ``model`` is parallelised in a way the backend
    does not support; ``attention_layers`` are the decoder's self-attention modules."""
    name = type(model).__name__
    config = getattr(model.config, "distributed_config", None)
    if config is not None:
        for field, allowed in (
            ("pp_size", "pipeline stages"),
            ("fsdp_size", "FSDP"),
            ("dp_replicate_size", "replicated data parallelism inside the model"),
            ("ep_size", "expert parallelism"),
        ):
            value = getattr(config, field, None) or 1
            if value > 1:
                raise ValueError(
                    f"csp_inductor does not support {allowed} ({name} has distributed_config."
                    f"{field}={value}); supported: tensor parallelism (tp_size / tp_plan) alone. "
                    "For data-parallel evaluation launch independent copies: torchrun "
                    "--nproc-per-node N -m csp_inductor eval"
                )
        if getattr(config, "enable_sequence_parallel", False):
            raise ValueError(
                f"csp_inductor does not support sequence parallelism ({name} has "
                "distributed_config.enable_sequence_parallel=True): the backend scores each "
                "prompt whole; supported: tensor parallelism by heads"
            )
    plan = getattr(model, "tp_plan", None) or {}
    for module, style in plan.items():
        if any(word in str(style) for word in UNSUPPORTED_STYLES):
            raise ValueError(
                f"csp_inductor does not support the tensor-parallel style {style!r} (tp_plan"
                f"[{module!r}] of {name}); supported: colwise / rowwise projections split by heads"
            )
    for index, attn in enumerate(attention_layers):
        shards = head_shards(attn)
        if shards == 1:
            continue
        where = f"{name} layer {index} is split over {shards} tensor-parallel ranks"
        if getattr(attn, "kv_lora_rank", None) is not None:
            raise ValueError(
                f"{where}, but csp_inductor does not support multi-head latent attention under "
                "tensor parallelism (the latent is not split by heads)"
            )
        if not all(isinstance(getattr(attn, p, None), nn.Linear) for p in HEAD_PROJECTIONS):
            raise ValueError(
                f"{where}, but its attention has no separate q_proj, k_proj and v_proj Linear "
                "layers (a fused QKV projection), which csp_inductor cannot split by heads"
            )
        cfg = attn.config
        q_heads = cfg.num_attention_heads
        kv_heads = attn.k_proj.out_features // _head_dim(attn)
        for field, heads in (("num_attention_heads", q_heads), ("kv heads", kv_heads)):
            if heads % shards:
                raise ValueError(
                    f"{where}, but its {field}={heads} does not divide by {shards}: each rank "
                    "must hold whole heads (and whole GQA groups); use a tp_size dividing both "
                    f"num_attention_heads={q_heads} and the kv heads={kv_heads}"
                )


def _head_dim(attn: nn.Module) -> int:
    cfg = attn.config
    return getattr(attn, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


@dataclass(frozen=True)
class Ranks:
    """The processes that share out work: this one is ``rank`` of ``size`` (1: alone)."""

    rank: int = 0
    size: int = 1

    @classmethod
    def launched(cls) -> Ranks:
        """This process's place in a ``torchrun`` launch (its process group is set up, gloo on
        CPU, NCCL on GPUs); ``Ranks()`` outside one."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size == 1:
            return cls()
        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return cls(dist.get_rank(), dist.get_world_size())

    @property
    def main(self) -> bool:
        """Whether this process prints and writes the results."""
        return self.rank == 0

    def deal(self, items: list) -> list:
        """This rank's share of ``items``: every ``size``-th, from its rank."""
        return items[self.rank :: self.size]

    def gather(self, value):
        """``value`` of every rank, in rank order (``[value]`` alone)."""
        if self.size == 1:
            return [value]
        values = [None] * self.size
        dist.all_gather_object(values, value)
        return values


ALONE = Ranks()  # one process: deals it everything, gathers its own
