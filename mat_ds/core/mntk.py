"""Modular neural tangent kernels (mNTK) of attention units and MoE experts, and their principal eigenvalues λmax.

For unit l, Θ^l = J_l J_lᵀ (n × n) where row i of J_l is the gradient of the scalar output f_i of probe sample i w.r.t.
unit l's parameters. We never build J_l from parameters:

1. one forward of the probe batch with every ``HeadwiseLinear`` recording its input X and output Y (and every MoE
   expert linear its slots, ``experts.record_routes``);
2. one ``torch.autograd.grad(Σ_i f_i, [Y...])``. Samples are independent in eval mode (no dropout, no cross-sample
   ops), so the rows of dΣf/dY belonging to sample i are exactly df_i/dY_i. Gradients are taken w.r.t. activations
   only: no parameter ``.grad`` is touched and no ZeRO reduce hook fires;
3. per-sample per-unit weight gradients G_i = dY_iᵀ X_i restricted to the unit's channels (``shard_unit_gram``), and
   Θ^l_ij = <G_i^l, G_j^l> summed over the unit's parameters in all head-wise linears of its layer (bias entries
   included: the per-sample bias gradient is Σ_t dY_it);
4. the work is split across the ranks of ``group`` and ONE all-reduce (sum) of the [units, n, n] float32 tensor
   completes it: O(units·n²) numbers per refresh, never a gather of parameters or Jacobians. Two splits:

   * ``"layer"`` (ZeRO 0/1/2, where every rank holds every weight): rank r handles layers l ≡ r mod world;
   * ``"shard"`` (ZeRO-3): Θ^l_ij = Σ_e G_i[e] G_j[e] is a sum over parameter elements e, so it splits over any
     disjoint cover of the elements. The cover used is ZeRO-3's own: DeepSpeed partitions each FLATTENED parameter
     into world equal chunks of ``ps = ceil(numel / world)`` (the last one padded), and rank r owns flat elements
     [r·ps, min((r+1)·ps, numel)). Each rank computes only the rows of dY_iᵀ X_i its chunk touches. Bias terms
     (tiny) are computed whole by rank l mod world.
   ``"auto"`` (default) picks "shard" when the head-wise parameters are ZeRO-3 partitioned, else "layer".

   The activations themselves are not split: every rank runs the probe's forward and activation backward on the
   whole (identical) probe batch; under ZeRO-3 that forward/backward all-gathers parameters exactly like a training
   forward does. ``probe_units`` reports both costs separately (``UnitProbe``). Why not split the samples too: the
   Gram's cross terms (i on one rank, j on another) need every layer's activations of the other ranks' samples,
   n·T·d numbers per layer (134 MB at n 16, T 512, d 4096), more traffic than the one n-sample forward/backward per
   refresh that splitting would save.

The scalar output f_i is the caller's ``probe_fn(model, batch) -> [n]`` (``mat_ds/core/probe.py`` has the defaults).
Experts: Θ^e = S K Sᵀ, S the slot -> sample indicator of expert e's capacity buffer, K the slot kernel
(``experts.expert_partial_grams``); same probe pass and same single all-reduce as the attention units. Per-expert
modules (``fused_experts.py`` protocol, e.g. converted HF Mixtral with top-k routing): Θ^e = S K Sᵀ over the tokens
routed to e (``fused_experts.fused_partial_grams``), after the deepspeed.moe experts in the same tensor.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from .experts import DeepSpeedMoESource, expert_partial_grams, record_routes  # noqa: F401 - public names
from .fused_experts import FusedExpertSource
from .headwise_gram import (SPLITS, HeadwiseSource, is_zero3_partitioned, record_activations,  # noqa: F401
                            resolve_split, shard_unit_gram, unit_bias_gram, unit_param_shape, zero3_owned_range)
from .sources import RoutingOnly, UnitSource, WorkSplit
from .topology import rank_in, size_of
from .units import KINDS, ModelUnits

ProbeFn = Callable[[nn.Module, dict], torch.Tensor]
__all__ = ["ProbeFn", "SPLITS", "UnitProbe", "comm_snapshot", "expert_partial_grams", "is_zero3_partitioned",
           "lambda_max", "probe_units", "record_activations", "record_routes", "resolve_split", "shard_unit_gram",
           "unit_bias_gram", "unit_param_shape", "unit_sources", "zero3_owned_range"]


def unit_sources(units: ModelUnits, kinds: tuple) -> list[UnitSource]:
    """The sources of the measured ``kinds``, in ``units.KINDS`` order (THE order of the Gram table). deepspeed.moe
    layers are always in probe mode (no token dropping), also when their experts are not measured: f_i must not
    depend on the other probe samples, nor on which kinds are measured (``mat.modules``)."""
    out: list[UnitSource] = []
    for kind in KINDS:
        if kind in ("heads", "mlp"):
            if kind in kinds and units.layers_of(kind):
                out.append(HeadwiseSource(kind, units.layers_of(kind)))
        elif units.moe_layers:
            moe = DeepSpeedMoESource(units.moe_layers)
            out.append(moe if kind in kinds else RoutingOnly(moe.recording()))
    if "experts" in kinds and getattr(units, "fused_expert_layers", None):
        out.append(FusedExpertSource(list(units.fused_expert_layers)))  # after deepspeed.moe's experts
    return out


def comm_snapshot() -> Optional[dict[str, int]]:
    """DeepSpeed comms-logger bytes per op, or None when the logger is off (so "not measured" never reads as 0)."""
    from deepspeed.comm import comm as ds_comm

    logger = getattr(ds_comm, "comms_logger", None)
    if logger is None or not logger.enabled:
        return None
    from .freezing import comm_bytes_snapshot
    return comm_bytes_snapshot()


@dataclass
class UnitProbe:
    """One mNTK refresh: the Grams and what it cost in communication and per-sample-gradient work on this rank."""

    head_grams: torch.Tensor  # [n_attention_units, n, n] float64 (float32 accuracy), identical on every rank
    expert_grams: Optional[torch.Tensor]  # [n_experts_total, n, n], None unless asked for
    split: str  # "layer" or "shard", as resolved from "auto"
    # Message bytes of the ONE Gram all-reduce (units·n²·4, fp32); 0 on a single rank. It goes through
    # torch.distributed directly, so it is NOT included in the comms logger's numbers (gradient-traffic metrics stay
    # gradient traffic).
    gram_allreduce_bytes: int
    # DeepSpeed traffic (comms logger, bytes per op on this rank) caused by the probe's forward + activation backward
    # (ZeRO-3's parameter all-gathers). None when the comms logger is off (not measured).
    probe_comm_bytes: Optional[dict[str, int]]
    grad_numel: int  # per-sample weight-gradient entries (n·params) this rank computed
    grad_numel_unsplit: int  # ... and what one rank computing all units would compute
    mlp_grams: Optional[torch.Tensor] = None  # [n_mlp_units, n, n], None unless asked for (probe_units(mlp=True))

    def head_lambda_max(self, normalize: str = "none") -> torch.Tensor:
        return lambda_max(self.head_grams, normalize)

    def mlp_lambda_max(self, normalize: str = "none") -> torch.Tensor:
        if self.mlp_grams is None:
            raise ValueError("this probe did not measure MLP units (probe_units(..., mlp=True))")
        return lambda_max(self.mlp_grams, normalize)

    def expert_lambda_max(self, normalize: str = "none") -> torch.Tensor:
        if self.expert_grams is None:
            raise ValueError("this probe did not measure experts (probe_units(..., experts=True))")
        return lambda_max(self.expert_grams, normalize)

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {"mat/refresh_comm_bytes": self.gram_allreduce_bytes}
        if self.probe_comm_bytes is not None:
            out["mat/probe_comm_bytes"] = sum(self.probe_comm_bytes.values())
        return out


def probe_units(model: nn.Module, units: ModelUnits, batch: dict, probe_fn: ProbeFn, group=None,
                split: str = "auto", experts: bool = False, gram: str = "auto",
                memory_limit_bytes: int = 2 << 30, mlp: bool = False, topology=None) -> UnitProbe:
    """Θ for every attention unit (with ``mlp``, every MLP unit; with ``experts``, every MoE expert) plus the refresh's
    communication and work, from ONE probe forward and ONE activation backward (see the module docstring): a loop
    over the unit sources (``sources.py``; ``unit_sources`` gives them in ``KINDS`` order) and one all-reduce.

    Every rank of ``group`` must call this with the same probe batch (one collective per call, in the same order).
    Experts are reduced over all ranks, so ``experts=True`` needs the default (world) group. ``batch`` must hold an
    ``input_ids`` tensor [n, T] (n samples; T = the positions the MoE layers see per sample).

    ``gram`` picks how each head-wise layer's Gram is formed: ``"materialized"`` (per-sample gradients),
    ``"ghost"`` (activation Grams, ``ghost.py``) or ``"auto"`` (per layer by ``ghost.choose``'s cost model within
    ``memory_limit_bytes``). A ghost layer is computed whole by rank ``layer mod world`` (also under ZeRO-3: it needs
    activations only).

    ``topology`` (``core.topology.Topology``) matters under tensor parallelism: each TP rank holds only its units
    (``core/tensor_parallel.py``), so the "layer" split runs over the data-parallel replicas (rank ``dp_rank`` of
    each replica's TP ranks handles layers l ≡ dp_rank mod dp_size, for the units it holds) and the one all-reduce
    is over the world: a unit's rows come from exactly one rank (its TP rank, in the replica its layer falls to),
    every other rank adds zeros, and every rank ends with the whole table.
    """
    if experts and group is not None:
        raise ValueError("experts=True reduces over the world group; do not pass a sub-group")
    n, T = batch["input_ids"].shape[:2]
    rank, world = rank_in(group), size_of(group)
    reduce_world = world  # the all-reduce's size; the WorkSplit's rank/world are the work split's
    if topology is not None and topology.tensor_parallel:
        if group is not None or experts:
            raise ValueError("under tensor parallelism the probe reduces over the world and measures no experts")
        rank, world = topology.dp_rank, topology.dp_size
    kinds = ("heads",) + (("mlp",) if mlp else ()) + (("experts",) if experts else ())
    work = WorkSplit(rank, world, resolve_split(units, split), gram, memory_limit_bytes, group)
    sources = unit_sources(units, kinds)

    was_training = model.training
    model.eval()
    comm_before = comm_snapshot()
    try:
        with torch.enable_grad(), contextlib.ExitStack() as stack:
            for source in sources:
                stack.enter_context(source.recording())
            f = probe_fn(model, batch)
            if f.shape != (n,):
                raise ValueError(f"probe_fn must return one scalar per probe sample, shape [{n}], got {tuple(f.shape)}")
            outputs = [source.outputs() for source in sources]
            flat = [y for outs in outputs for y in outs]
            grads = torch.autograd.grad(f.float().sum(), flat, allow_unused=True) if flat else ()
            device = batch["input_ids"].device
            parts, k = [], 0
            for source, outs in zip(sources, outputs):
                parts.append(source.partial_grams(grads[k:k + len(outs)], (n, T), work, device))
                k += len(outs)
    finally:
        model.train(was_training)
    comm_after = comm_snapshot()
    probe_comm = None
    if comm_before is not None and comm_after is not None:
        probe_comm = {op: b - comm_before.get(op, 0) for op, b in comm_after.items() if b - comm_before.get(op, 0)}

    table = torch.cat([p.to(device) for p in parts]) if parts else torch.zeros(0, n, n, device=device)
    sent = 0
    if reduce_world > 1:  # ONE all-reduce for every kind of unit
        import torch.distributed as dist  # the collective itself; ranks and groups come from topology.py

        dist.all_reduce(table, group=group)
        sent = table.numel() * table.element_size()
    table = table.double()
    by_kind: dict[str, list] = {}
    start = 0
    for source, part in zip(sources, parts):
        by_kind.setdefault(source.kind, []).append(table[start:start + part.shape[0]])
        start += part.shape[0]
    grams = {kind: torch.cat(blocks) for kind, blocks in by_kind.items()}
    headwise = [s for s in sources if isinstance(s, HeadwiseSource)]
    empty = torch.zeros(0, n, n, dtype=torch.float64, device=device)
    return UnitProbe(grams.get("heads", empty), grams.get("experts") if experts else None, work.split, sent,
                     probe_comm, sum(s.done for s in headwise), sum(s.total for s in headwise),
                     mlp_grams=grams.get("mlp") if mlp else None)


def lambda_max(grams: torch.Tensor, normalize: str = "none") -> torch.Tensor:
    """Principal eigenvalue of each symmetric PSD Gram; [..., n, n] -> [...] (float64).

    ``normalize`` (``mat.probe_normalize``) makes it scale-free, on the FINAL Gram (after the all-reduce; every Gram
    form, materialized/ghost/ZeRO-3 shard split/experts, ends here): ``"none"`` λmax(Θ); ``"cosine"`` λmax of
    Θ_ij/sqrt(Θ_ii·Θ_jj) (in [1, n]: alignment of the unit's per-sample gradients; a sample whose diagonal is <= 0,
    i.e. a zero gradient, gets a zero row and column, so a unit with no gradient scores 0); ``"trace"``
    λmax(Θ)/trace(Θ) (in [1/n, 1]; 0 where the trace is <= 0)."""
    sym = 0.5 * (grams + grams.transpose(-1, -2))  # exact symmetry for eigvalsh
    sym = sym.double().cpu()
    if normalize == "cosine":
        diag = torch.diagonal(sym, dim1=-2, dim2=-1)
        inv = torch.where(diag > 0, diag.clamp_min(1e-300).rsqrt(), torch.zeros_like(diag))
        sym = sym * inv.unsqueeze(-1) * inv.unsqueeze(-2)
    elif normalize not in ("none", "trace"):
        raise ValueError(f"normalize={normalize!r} is not one of 'none', 'cosine', 'trace'")
    lam = torch.linalg.eigvalsh(sym)[..., -1]
    if normalize == "trace":
        trace = torch.diagonal(sym, dim1=-2, dim2=-1).sum(-1)
        lam = torch.where(trace > 0, lam / trace.clamp_min(1e-300), torch.zeros_like(lam))
    return lam
