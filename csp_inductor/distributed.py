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

import atexit
import contextlib
import fnmatch
import os
from dataclasses import dataclass

import torch.distributed as dist
from torch import nn

# the projections whose output rows are heads
HEAD_PROJECTIONS = ("q_proj", "k_proj", "v_proj")
# transformers' styles that split a weight by rows but give every rank the whole output
WHOLE_OUTPUT_STYLES = ("colwise_gather_output", "colwise_rep")


def head_shards(attn: nn.Module, styles: dict[str, str] | None = None) -> int:
    """Over how many ranks ``attn``'s heads are split: the mesh size of its column-split
    (``Shard(0)``) ``q_proj``/``k_proj``/``v_proj`` weights (those it has), 1 when no submodule
    of ``attn`` is split so that its output is. ``styles``: the TP plan's style of ``attn``'s
    submodules by name (``colwise_gather_output`` splits a weight, not its output). Raises when
    the output is split some other way (a fused QKV projection, projections that disagree)."""
    from torch.distributed.tensor import Shard

    styles = styles or {}
    split = {}  # submodule -> mesh size, for those whose output is split
    for name, module in attn.named_modules():
        for weight in module.parameters(recurse=False):
            placements = _split_placements(weight)
            # whole output: not split, split by input (Shard(1), as o_proj: all-reduced), or
            # gathered by its style
            if placements in ((), (Shard(1),)) or styles.get(name) in WHOLE_OUTPUT_STYLES:
                continue
            if placements != (Shard(0),) or name not in HEAD_PROJECTIONS:
                raise ValueError(
                    f"csp_inductor supports tensor-parallel attention split by heads: "
                    f"{', '.join(HEAD_PROJECTIONS)} split by rows (Shard(0)); "
                    f"{type(attn).__name__}.{name or '(itself)'} has a weight split as "
                    f"{placements} (e.g. a fused QKV projection)"
                )
            split[name] = weight.device_mesh.size()
    if not split:
        return 1
    present = [p for p in HEAD_PROJECTIONS if getattr(attn, p, None) is not None]
    if set(split) != set(present) or len(set(split.values())) > 1:
        raise ValueError(
            f"csp_inductor needs {', '.join(present)} of {type(attn).__name__} split over the "
            f"same ranks, got split over (ranks): {split}"
        )
    return split["q_proj"]


def _split_placements(weight) -> tuple:
    """A DTensor weight's placements when it is split over more than one rank, else ()."""
    from torch.distributed.tensor import DTensor, Replicate

    if not isinstance(weight, DTensor) or weight.device_mesh.size() == 1:
        return ()
    placements = tuple(weight.placements)
    return () if all(isinstance(p, Replicate) for p in placements) else placements


def tp_loading(plan: str | dict = "auto") -> dict:
    """``from_pretrained``'s arguments for tensor parallelism by ``plan``: a
    ``DistributedConfig`` (transformers >= 5.3), or ``tp_plan`` itself (earlier)."""
    from transformers.distributed import DistributedConfig

    if "tp_plan" in DistributedConfig.__dataclass_fields__:
        return {"distributed_config": DistributedConfig(tp_plan=plan)}
    return {"tp_plan": plan}


def check_layout(model: nn.Module, attention: dict[int, nn.Module]) -> dict[int, int]:
    """Raise a ValueError naming the layout when ``model`` is parallelised in a way the backend
    does not support. ``attention``: the decoder's self-attention modules by layer index.
    Returns over how many ranks each one's heads are split."""
    name = type(model).__name__
    config = getattr(model.config, "distributed_config", None)
    if config is not None:
        for field, what in (
            ("pp_size", "pipeline stages"),
            ("fsdp_size", "FSDP"),
            ("dp_replicate_size", "replicated data parallelism inside the model"),
            ("ep_size", "expert parallelism"),
        ):
            value = getattr(config, field, None) or 1
            if value > 1:
                raise ValueError(
                    f"csp_inductor does not support {what} ({name} has distributed_config."
                    f"{field}={value}); allowed: {field}=1, with tensor parallelism (tp_size / "
                    "tp_plan) alone. For data-parallel evaluation launch independent copies: "
                    "torchrun --nproc-per-node N -m csp_inductor eval"
                )
        if getattr(config, "enable_sequence_parallel", False):
            raise ValueError(
                f"csp_inductor does not support sequence parallelism ({name} has "
                "distributed_config.enable_sequence_parallel=True; allowed: False): the backend "
                "scores each prompt whole"
            )
    # (a model declares its plan whether or not it was loaded split by it)
    split = (getattr(model, "_tp_size", None) or 1) > 1
    plan = (getattr(model, "tp_plan", None) or {}) if split else {}
    for module, style in plan.items():
        if "sequence" in str(style):
            raise ValueError(
                f"csp_inductor does not support the tensor-parallel style {style!r} (tp_plan"
                f"[{module!r}] of {name}): the backend scores each prompt whole; allowed: "
                "styles that split projections by heads or rows (colwise, rowwise, ...)"
            )
    names = {id(module): qualified for qualified, module in model.named_modules()} if plan else {}
    shards = {}
    for index, attn in attention.items():
        prefix = names.get(id(attn), "")
        styles = {
            sub: style
            for sub, _ in attn.named_modules()
            for pattern, style in plan.items()
            if fnmatch.fnmatchcase(f"{prefix}.{sub}" if sub else prefix, pattern)
        }
        kv_lora_rank = getattr(attn, "kv_lora_rank", None)
        if kv_lora_rank is not None and any(map(_split_placements, attn.parameters())):
            raise ValueError(
                f"{name} layer {index} is tensor-parallel with multi-head latent attention "
                f"(kv_lora_rank={kv_lora_rank}), which csp_inductor does not support under "
                "tensor parallelism (the latent is not split by heads); allowed: load it "
                "without a tp_plan (data-parallel evaluation: torchrun ... eval)"
            )
        shards[index] = head_shards(attn, styles)
        if shards[index] > 1:
            _check_divisible(name, index, attn, shards[index])
    return shards


def _check_divisible(name: str, index: int, attn: nn.Module, shards: int) -> None:
    """Each rank must hold whole heads, and whole GQA groups."""
    head_dim = getattr(attn, "head_dim", None) or attn.config.hidden_size // (
        attn.config.num_attention_heads
    )
    counts = {"num_attention_heads": attn.config.num_attention_heads}
    if getattr(attn, "k_proj", None) is not None:
        counts["k_proj.out_features // head_dim (KV heads)"] = attn.k_proj.out_features // head_dim
    for field, heads in counts.items():
        if heads % shards:
            raise ValueError(
                f"{name} layer {index} is split over {shards} tensor-parallel ranks, but its "
                f"{field}={heads} does not divide by {shards}: each rank must hold whole heads "
                f"(and whole GQA groups); allowed: a tp_size dividing {sorted(counts.values())}"
            )


@dataclass(frozen=True)
class Ranks:
    """The processes that share out work: this one is ``rank`` of ``size`` (1: alone)."""

    rank: int = 0
    size: int = 1

    @classmethod
    def launched(cls) -> Ranks:
        """This process's place in a ``torchrun`` launch (its process group set up: gloo, as
        the evaluation runs on CPU and exchanges small Python objects); ``Ranks()`` outside
        one. A group set up here is torn down at exit: gloo's threads left to the interpreter's
        shutdown can abort the process after its work is done."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size == 1:
            return cls()
        if not dist.is_initialized():
            dist.init_process_group("gloo")
            atexit.register(_leave_process_group)
        return cls(dist.get_rank(), dist.get_world_size())

    @property
    def main(self) -> bool:
        """Whether this process prints and writes the results."""
        return self.rank == 0

    def deal(self, items: list) -> list:
        """This rank's share of ``items``: every ``size``-th, from its rank."""
        return items[self.rank :: self.size]

    def gather(self, value):
        """``value`` of every rank, in rank order (``[value]`` alone). Raises when another rank
        failed in :meth:`failing_together` instead."""
        if self.size == 1:
            return [value]
        values = [None] * self.size
        dist.all_gather_object(values, value)
        failed = [v for v in values if isinstance(v, Failed)]
        if failed and not isinstance(value, Failed):
            raise RuntimeError(f"rank {failed[0].rank} failed: {failed[0].error}")
        return values

    @contextlib.contextmanager
    def failing_together(self):
        """Around a share of work whose results :meth:`gather` collects next: an exception in
        it goes to the other ranks' gather, which raise too, instead of waiting for this rank
        forever."""
        try:
            yield
        except Exception as error:
            if self.size > 1:
                self.gather(Failed(self.rank, f"{type(error).__name__}: {error}"))
            raise


@dataclass(frozen=True)
class Failed:
    """What a rank whose share failed sends to the others' gather."""

    rank: int
    error: str


def _leave_process_group() -> None:
    if dist.is_initialized():  # a caller may have torn it down already
        dist.destroy_process_group()


ALONE = Ranks()  # one process: deals it everything, gathers its own
