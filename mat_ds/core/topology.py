"""Where this rank sits in the parallel layout: ONE object, built once per engine from DeepSpeed's own groups.

``Topology.from_engine(engine)`` is called by ``mat_ds.initialize`` right after ``deepspeed.initialize`` (through
``attach``) and kept as ``engine.mat.topology``. It reads the groups DeepSpeed 0.19.8 itself reduces and shards over,
instead of assuming that the world is one data-parallel group:

* data parallel: ``engine.data_parallel_group`` / ``engine.dp_world_size`` (``groups._get_data_parallel_group()``;
  under AutoTP the ``"data_parallel"`` dimension of the (dp, tp) mesh, else a clone of the world group). ZeRO
  reduces gradients and partitions optimizer state over ``engine.seq_data_parallel_group``, which is the same group
  unless sequence parallelism is on (it then also spans the sequence ranks); kept as ``grad_group``;
* tensor parallel: ``deepspeed.utils.groups.get_tensor_model_parallel_group()`` (the ``"tensor_parallel"`` mesh
  dimension: ranks ``[d·tp, (d+1)·tp)`` form replica d's TP group), set up by the engine when the JSON has
  ``"tensor_parallel": {"autotp_size": tp}``, or by ``ensure_tp_groups`` BEFORE the engine when mat_ds must shard the
  head-wise layers first (``mat_ds/core/tensor_parallel.py``; the engine then reuses the same groups);
* expert parallel: ``engine.expert_parallel_group`` (group name -> group), sizes only.

This module is the ONE place of mat_ds that asks ``torch.distributed`` for a rank or a group size
(``tests/test_house.py`` checks it): everything else takes a ``Topology`` (``from_engine`` once the engine exists,
``current()`` for the whole-world view before it: the trainer's rank-0 work, checkpoint broadcasts, error reports) or
asks ``rank_in(group)`` / ``size_of(group)`` about a group DeepSpeed made for one purpose (a deepspeed.moe layer's
expert-data-parallel group, a ZeRO-3 parameter's partition group when DeepSpeed did not cache its rank in it).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch.distributed as dist

from .config import ConfigError


@dataclass(frozen=True)
class Topology:
    """This rank's place in the (data × tensor [× expert]) layout, and the ZeRO stage."""

    rank: int
    """Global rank (``torch.distributed``), 0 without a process group."""
    world: int
    """Number of ranks in the whole job."""
    dp_group: Any = None
    """The data-parallel group: ranks that hold the same parameters and see different data (None: single process)."""
    dp_rank: int = 0
    """This rank's index in ``dp_group``."""
    dp_size: int = 1
    """Size of ``dp_group``: model replicas."""
    grad_group: Any = None
    """The group ZeRO reduces gradients / partitions optimizer state over (``dp_group`` unless sequence parallel)."""
    tp_group: Any = None
    """The tensor-parallel group: ranks that hold different shards of one replica and see the same data (None:
    no tensor parallelism)."""
    tp_rank: int = 0
    """This rank's index in ``tp_group``: which shard of every tensor-parallel layer it holds."""
    tp_size: int = 1
    """Size of ``tp_group`` (``tensor_parallel.autotp_size``; 1 without tensor parallelism)."""
    ep_sizes: dict = field(default_factory=dict)
    """Expert-parallel group name -> its size (deepspeed.moe layers; empty without MoE)."""
    zero_stage: int = 0
    """``zero_optimization.stage`` of the engine."""

    @classmethod
    def single(cls) -> "Topology":
        """One process, nothing parallel (also what a rank without a process group sees)."""
        return cls(rank=0, world=1)

    @classmethod
    def current(cls) -> "Topology":
        """The whole-world view (every rank one data-parallel replica), for code that runs before an engine exists
        or does not care about its groups: rank 0's file work, barriers, broadcasts. Single process without a
        process group."""
        if not distributed():
            return cls.single()
        rank, world = dist.get_rank(), dist.get_world_size()
        return cls(rank=rank, world=world, dp_rank=rank, dp_size=world)

    @classmethod
    def from_engine(cls, engine) -> "Topology":
        """Read the layout from a built ``DeepSpeedEngine`` (see the module docstring for which groups)."""
        stage = int(engine.zero_optimization_stage())
        if not distributed():
            return cls(rank=0, world=1, zero_stage=stage)
        from deepspeed.utils import groups

        dp_group = engine.data_parallel_group
        tp_size = int(engine.autotp_size() or 1) if hasattr(engine, "autotp_size") else 1
        tp_group, tp_rank = None, 0
        if tp_size > 1:
            tp_group = groups.get_tensor_model_parallel_group()
            tp_rank = dist.get_rank(group=tp_group)
            tp_size = dist.get_world_size(group=tp_group)
        elif getattr(engine, "mpu", None) is not None and getattr(engine, "mp_world_size", 1) > 1:
            # A Megatron-style mpu with model parallelism that mat_ds did not shard for: nothing in MAT would know
            # which heads this rank holds.
            raise ConfigError("mat_ds supports tensor parallelism through DeepSpeed AutoTP only (\"tensor_parallel\": "
                              "{\"autotp_size\": N} in the DeepSpeed JSON), not through an mpu passed to initialize")
        grad_group = getattr(engine, "seq_data_parallel_group", None) or dp_group
        return cls(rank=dist.get_rank(), world=dist.get_world_size(),
                   dp_group=dp_group, dp_rank=dist.get_rank(group=dp_group),
                   dp_size=dist.get_world_size(group=dp_group),
                   grad_group=grad_group, tp_group=tp_group, tp_rank=tp_rank, tp_size=tp_size,
                   ep_sizes={name: dist.get_world_size(group=g)
                             for name, g in (getattr(engine, "expert_parallel_group", None) or {}).items()},
                   zero_stage=stage)

    @property
    def is_main(self) -> bool:
        """Rank 0 of the whole job: the one that writes files, prints and logs."""
        return self.rank == 0

    @property
    def tensor_parallel(self) -> bool:
        return self.tp_size > 1

    def describe(self) -> str:
        return f"world {self.world} = dp {self.dp_size} x tp {self.tp_size}, ZeRO-{self.zero_stage}"


def distributed() -> bool:
    """True when a default process group exists (a launched job; False in a plain single process)."""
    return dist.is_available() and dist.is_initialized()


def rank_in(group=None) -> int:
    """This rank's index in ``group`` (None: the world); 0 without a process group."""
    return dist.get_rank(group=group) if distributed() else 0


def size_of(group=None) -> int:
    """Number of ranks in ``group`` (None: the world); 1 without a process group."""
    return dist.get_world_size(group=group) if distributed() else 1


def autotp_size(ds_config: Optional[dict]) -> int:
    """``tensor_parallel.autotp_size`` of a DeepSpeed config dict (1 when absent or 0: AutoTP off)."""
    tp = ((ds_config or {}).get("tensor_parallel") or {}).get("autotp_size", 0) or 0
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 0:
        raise ConfigError(f"tensor_parallel.autotp_size={tp!r} must be an integer >= 0 (0 or 1: off)")
    return max(tp, 1)


def ensure_tp_groups(tp_size: int) -> tuple[Any, int, int]:
    """(group, rank in it, size) of this rank's tensor-parallel group, creating DeepSpeed's (dp, tp) groups now if the
    engine has not yet: ``groups._init_tp_mesh_device`` is the call that
    ``DeepSpeedEngine._configure_tensor_parallel_states`` makes (0.19.8); it returns at once when the groups exist, so
    the engine built afterwards uses THESE groups and mat_ds's shards and AutoTP's shards live on the same ranks."""
    import deepspeed
    from deepspeed.utils import groups

    if not deepspeed.comm.is_initialized():
        deepspeed.init_distributed()  # what deepspeed.initialize would do first anyway
    world = dist.get_world_size()
    if world % tp_size:
        raise ConfigError(f"tensor_parallel.autotp_size={tp_size} does not divide the {world} ranks of this job")
    groups._init_tp_mesh_device(tensor_model_parallel_size=tp_size)
    group = groups.get_tensor_model_parallel_group()
    return group, dist.get_rank(group=group), dist.get_world_size(group=group)
