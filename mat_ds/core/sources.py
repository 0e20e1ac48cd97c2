"""Unit sources: the one protocol through which the probe finds, records and measures each kind of MAT unit.

``mntk.probe_units`` is a loop over sources, in the order of ``units.KINDS`` (heads, mlp, experts): it opens every
source's recording, runs ONE probe forward, takes ONE activation backward w.r.t. the outputs all sources recorded,
asks each source for its share of the Gram of its units, and completes all of them with ONE all-reduce. A new kind
of unit (or a new way a model holds one) is one class implementing ``UnitSource``; the core's implementations:

* ``headwise_gram.HeadwiseSource``: head-wise linears of kind "heads" (attention heads / KV groups) or "mlp" (groups
  of MLP hidden channels): per-sample weight gradients or ghost Grams, split over layers or ZeRO-3 shards;
* ``experts.DeepSpeedMoESource``: experts of ``deepspeed.moe`` layers (slot kernels over the capacity buffers);
* ``fused_experts.FusedExpertSource``: per-expert modules of the ``fused_experts`` protocol (e.g. HF Mixtral).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, ContextManager, Iterator, Optional, Protocol, Sequence, runtime_checkable

import torch


@dataclass(frozen=True)
class WorkSplit:
    """How the Gram work of one refresh is divided over ranks (from the ``Topology``), and how head-wise Grams are
    formed. Every rank computes a disjoint share; the probe's all-reduce (sum) over ``reduce_group`` completes it."""

    rank: int
    """This rank's index among the ranks that split head-wise layers (the DP replica under tensor parallelism)."""
    world: int
    """Number of ranks that split head-wise layers."""
    split: str = "layer"
    """``"layer"`` (whole layers per rank) or ``"shard"`` (ZeRO-3: each rank its parameter chunk), resolved."""
    gram: str = "auto"
    """``"materialized"``, ``"ghost"`` or ``"auto"`` (``ghost.choose``'s cost model)."""
    memory_limit_bytes: int = 2 << 30
    """Bound on the per-sample-gradient memory of one layer's Gram (``mat.probe_memory_mb``)."""
    reduce_group: Any = None
    """The group of the one all-reduce (None: the world)."""


@runtime_checkable
class UnitSource(Protocol):
    """One kind of unit held by the model, as the probe sees it."""

    kind: str
    """The unit kind (``units.KINDS``) whose rows of the Gram table this source fills."""

    def size(self) -> int:
        """Number of units (rows of the Gram table), over ALL ranks (the table is global)."""

    def recording(self) -> ContextManager[Any]:
        """Context in which the probe forward records what this source needs (activations, routes)."""

    def outputs(self) -> list[torch.Tensor]:
        """After the forward: the recorded tensors whose gradients d(Σ_i f_i)/dY this source needs."""

    def partial_grams(self, grads: Sequence[Optional[torch.Tensor]], shape: tuple[int, int],
                      work: WorkSplit, device) -> torch.Tensor:
        """This rank's share of Θ for every unit, float32 [size(), n, n] (zeros where other ranks compute).
        ``grads`` pairs with ``outputs()`` (None: that output does not reach f); ``shape`` = (n, T)."""


class RecordingSource:
    """Shared body of the sources whose probe forward records through one context manager over their layers (the
    expert sources: routes and expert activations). The record is kept from the forward (``outputs`` reads it) until
    ``partial_grams`` turns it into Grams and drops it (``_take``), so no activation outlives the refresh."""

    kind = "experts"

    def __init__(self, layers: list):
        self.layers = list(layers)
        self._recorded: list = []

    def _record(self) -> ContextManager[list]:
        raise NotImplementedError

    @contextlib.contextmanager
    def recording(self) -> Iterator[list]:
        with self._record() as recorded:
            self._recorded = recorded
            yield recorded

    def _take(self) -> list:
        recorded, self._recorded = self._recorded, []
        return recorded


class RoutingOnly:
    """A source that only needs its recording context, measuring nothing: ``deepspeed.moe`` layers in probe mode
    when only heads/MLP units are measured (f_i must not depend on other samples, nor on what is measured)."""

    kind = "experts"

    def __init__(self, context: ContextManager[Any]):
        self._context = context

    def size(self) -> int:
        return 0

    def recording(self) -> ContextManager[Any]:
        return self._context

    def outputs(self) -> list[torch.Tensor]:
        return []

    def partial_grams(self, grads, shape, work, device) -> torch.Tensor:
        n = shape[0]
        return torch.zeros(0, n, n, dtype=torch.float32, device=device)
