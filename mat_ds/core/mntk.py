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
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

from . import ghost
from .experts import expert_partial_grams, record_routes
from .fused_experts import fused_outputs, fused_partial_grams, record_fused
from .headwise import HeadwiseLinear
from .units import ModelUnits

SPLITS = ("auto", "layer", "shard")
ProbeFn = Callable[[nn.Module, dict], torch.Tensor]


@contextlib.contextmanager
def record_activations(layers: list[HeadwiseLinear]) -> Iterator[list]:
    """Make every head-wise linear append (module, X, Y) to the yielded list while the context is open."""
    records: list = []
    for m in layers:
        m.recorder = records
    try:
        yield records
    finally:
        for m in layers:
            m.recorder = None


def is_zero3_partitioned(p: torch.nn.Parameter) -> bool:
    """True for a parameter that ZeRO-3 has partitioned (it carries its local chunk in ``ds_tensor``)."""
    return getattr(p, "ds_tensor", None) is not None


def zero3_owned_range(p: torch.nn.Parameter) -> tuple[int, int, int]:
    """(lo, hi, world): the flat elements [lo, hi) of ``p`` held in this rank's ZeRO-3 chunk, and the partition size.

    Mirrors ``deepspeed.runtime.zero.partition_parameters.Init._partition_param`` (0.19.8): the flattened parameter
    is padded to a multiple of the partition world and cut into equal chunks of ``ds_tensor.ds_numel`` elements;
    rank r of ``p.ds_process_group`` holds [r·ps, (r+1)·ps), of which only the part below ``ds_numel`` is real
    (a rank may own nothing at all when numel < world). tests/scripts/zero3_gram_check.py checks this against
    ``deepspeed.zero.GatheredParameters``.
    """
    ps = int(getattr(p.ds_tensor, "ds_numel", p.ds_tensor.numel()))
    pg = getattr(p, "ds_process_group", None)
    rank = getattr(p, "ds_zero_partition_rank", None)
    world = getattr(p, "ds_zero_partition_world_size", None)
    if rank is None or world is None:  # older/newer DeepSpeed without the cached values
        rank, world = dist.get_rank(group=pg), dist.get_world_size(group=pg)
    numel = int(p.ds_numel)
    lo = min(int(rank) * ps, numel)
    return lo, min(lo + ps, numel), int(world)


def unit_param_shape(module: HeadwiseLinear) -> tuple[int, int]:
    """(rows, cols) of ONE unit's weight parameter of a head-wise linear."""
    k = module.unit_layout().shape[1]
    return (k, module.d_in) if module.split == "out" else (module.d_out, k)


def shard_unit_gram(x: torch.Tensor, dy: torch.Tensor, module: HeadwiseLinear, lo: int, hi: int) -> torch.Tensor:
    """Partial Gram Σ_{e in [lo, hi)} G_i^u[e] G_j^u[e] of every unit u over one flat element range of its weight
    parameter: [U, n, n]. ``x`` [n, T, d_in], ``dy`` [n, T, d_out] are the layer's input and output gradient.

    [lo, hi) indexes the row-major flattening of ONE unit's weight (``w{u}``) and is the same for every unit, because
    all units of a layer have the same shape and hence the same ZeRO-3 chunking. [0, rows·cols) gives the full Gram.
    Only the parameter rows the range touches are computed (at most two of them partial), so a rank owning 1/world of
    the elements does ~1/world of the GEMM work.
    """
    n, U = x.shape[0], module.n_units
    rows, cols = unit_param_shape(module)
    if not 0 <= lo <= hi <= rows * cols:
        raise ValueError(f"range [{lo}, {hi}) outside a unit parameter of {rows}x{cols} elements")
    if hi == lo:  # this rank owns nothing of the parameter (numel < world, or the padded tail)
        return torch.zeros(U, n, n, dtype=x.dtype, device=x.device)
    lay = module.unit_layout().to(x.device)
    r0, r1 = lo // cols, (hi - 1) // cols + 1  # parameter rows [r0, r1) hold the range
    a, b = lo - r0 * cols, hi - r0 * cols  # the range within those rows, flattened
    out = torch.empty(U, n, n, dtype=x.dtype, device=x.device)
    # One unit at a time, into buffers allocated once: only ONE unit's per-sample gradients (1/U of the layer's) and
    # one activation slice exist at once, which is what the cost model (ghost.layer_cost) charges and
    # mat.probe_memory_mb bounds (fresh tensors per unit let the allocator hold several at its peak).
    T = x.shape[1]
    if module.split == "out":  # row r of unit u is output channel lay[u, r]; X stays whole
        sel = torch.empty(n, T, r1 - r0, dtype=dy.dtype, device=dy.device)
        g = torch.empty(n, r1 - r0, cols, dtype=x.dtype, device=x.device)
    else:  # row r of every unit is output channel r; unit u owns input channels lay[u]
        sel = torch.empty(n, T, cols, dtype=x.dtype, device=x.device)
        g = torch.empty(n, r1 - r0, cols, dtype=x.dtype, device=x.device)
        dy_rows = dy[..., r0:r1].transpose(1, 2)  # [n, nr, T], a view
    for u in range(U):
        if module.split == "out":
            torch.index_select(dy, -1, lay[u, r0:r1], out=sel)
            torch.bmm(sel.transpose(1, 2), x, out=g)  # [n, nr, d_in]
        else:
            torch.index_select(x, -1, lay[u], out=sel)
            torch.bmm(dy_rows, sel, out=g)  # [n, nr, k]
        flat = g.view(n, -1)[:, a:b]  # drop the parts of the partial first/last rows outside the range
        out[u] = flat @ flat.t()
    return out


def unit_bias_gram(dy: torch.Tensor, module: HeadwiseLinear) -> torch.Tensor:
    """Θ contribution of the per-unit biases (split "out"): per-sample bias gradient Σ_t dY_it[lay[u]]. [U, n, n]."""
    lay = module.unit_layout().to(dy.device)
    gb = dy.sum(1).index_select(-1, lay.flatten()).reshape(dy.shape[0], module.n_units, -1)  # [n, U, k]
    return torch.einsum("nuk,muk->unm", gb, gb)


def resolve_split(units: ModelUnits, split: str = "auto") -> str:
    """``"auto"`` -> ``"shard"`` if the head-wise parameters are ZeRO-3 partitioned, else ``"layer"``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if split != "auto":
        return split
    params = [p for u in units.heads + units.mlp for p in u.params]
    return "shard" if any(is_zero3_partitioned(p) for p in params) else "layer"


def _owned_range(module: HeadwiseLinear, layer: int, split: str, rank: int, world: int) -> tuple[int, int]:
    """The flat range [lo, hi) of each unit weight of ``module`` whose Gram terms this rank computes."""
    rows, cols = unit_param_shape(module)
    params = module.weight_params()
    if split == "shard" and is_zero3_partitioned(params[0]):
        ranges = {zero3_owned_range(p) for p in params}
        if len(ranges) != 1:  # cannot happen for equal-shaped units in one group; never sum a wrong cover
            raise RuntimeError(f"units of one layer are chunked differently by ZeRO-3: {sorted(ranges)}")
        lo, hi, part_world = ranges.pop()
        if part_world != world:
            # e.g. MiCS/hpZ-style sub-group partitioning: summing over `group` would count elements several times.
            raise ValueError(f"ZeRO-3 partitions head-wise parameters over {part_world} ranks but the Gram is reduced "
                             f"over {world}; pass the partition group as `group`, or use split='layer'")
        return lo, hi
    # split="layer", or a head-wise layer that is not partitioned: the whole layer goes to one rank.
    return (0, rows * cols) if layer % world == rank else (0, 0)


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
    communication and work, from ONE probe forward and ONE activation backward (see the module docstring). MLP units
    are head-wise linears like attention units, so they take exactly the same path (materialised or ghost form, layer
    or ZeRO-3 shard split) and share the one all-reduce.

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
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank(group) if distributed else 0
    world = dist.get_world_size(group) if distributed else 1
    reduce_world = world  # the all-reduce's size; `rank`/`world` below are the work split's
    if topology is not None and topology.tensor_parallel:
        if group is not None or experts:
            raise ValueError("under tensor parallelism the probe reduces over the world and measures no experts")
        rank, world = topology.dp_rank, topology.dp_size
    split = resolve_split(units, split)
    kinds = ["heads"] + (["mlp"] if mlp and units.mlp else [])
    layers = [m for kind in kinds for mods in units.layers_of(kind).values() for m in mods]
    moe = units.moe_layers if experts else []
    fused = list(getattr(units, "fused_expert_layers", [])) if experts else []  # per-expert modules (fused_experts.py)

    was_training = model.training
    model.eval()
    comm_before = comm_snapshot()
    try:
        # Probe-mode routing (no token dropping) in EVERY MoE layer, also when only heads are measured: f_i must not
        # depend on the other probe samples, nor on whether experts are measured too (mat.modules).
        with torch.enable_grad(), record_activations(layers) as records, \
                record_routes(units.moe_layers) as routes, record_fused(fused) as frecs:
            f = probe_fn(model, batch)
            if f.shape != (n,):
                raise ValueError(f"probe_fn must return one scalar per probe sample, shape [{n}], got {tuple(f.shape)}")
            outputs = [y for (_, _, y) in records]
            expert_outputs = [y for rec in routes for recs in rec["linears"].values() for (_, y, _) in recs] \
                if moe else []
            k0, k1 = len(outputs), len(outputs) + len(expert_outputs)
            grads = torch.autograd.grad(f.float().sum(), outputs + expert_outputs + fused_outputs(frecs),
                                        allow_unused=True)
            egrams = expert_partial_grams(moe, routes, grads[k0:k1], (n, T)) if moe else None
            if fused:  # experts of protocol modules (e.g. converted HF Mixtral) follow deepspeed.moe's in unit order
                fgrams = fused_partial_grams(fused, frecs, grads[k1:], (n, T), batch["input_ids"].device)
                egrams = fgrams if egrams is None else torch.cat([egrams.to(fgrams.device), fgrams])
            grads = grads[:k0]
    finally:
        model.train(was_training)
    comm_after = comm_snapshot()
    probe_comm = None
    if comm_before is not None and comm_after is not None:
        probe_comm = {op: b - comm_before.get(op, 0) for op, b in comm_after.items() if b - comm_before.get(op, 0)}

    # Row offset of each (kind, layer)'s units in ONE tensor of all head-wise units: heads by layer, then MLP units by
    # layer (layers sorted by tag, as in units.heads / units.mlp).
    offset, start, n_kind = {}, 0, {}
    for kind in kinds:
        by_layer = units.layers_of(kind)
        first = start
        for layer in sorted(by_layer):
            offset[(kind, layer)] = start
            start += by_layer[layer][0].units_total  # all TP ranks' units: the table is global
        n_kind[kind] = start - first
    device = batch["input_ids"].device
    grams = torch.zeros(start, n, n, dtype=torch.float32, device=device)
    done = total = 0
    for (module, x, _), dy in zip(records, grads):
        layer, U = int(module.layer), module.n_units
        base = offset[(getattr(module, "kind", "heads"), layer)] + module.unit_offset  # this rank's first unit
        rows, cols = unit_param_shape(module)
        total += n * U * rows * cols
        if dy is None:  # this output does not reach f (cannot happen for a connected model): Θ contribution 0
            continue
        x, dy = x.float(), dy.float()
        sl = slice(base, base + U)
        if ghost.choose(module, n, x.shape[1], gram, memory_limit_bytes) == "ghost":
            if layer % world == rank:
                grams[sl] += ghost.ghost_unit_gram(x, dy, module)
            if module.has_unit_bias and layer % world == rank:
                grams[sl] += unit_bias_gram(dy, module)
            continue
        lo, hi = _owned_range(module, layer, split, rank, world)
        if hi > lo:
            grams[sl] += shard_unit_gram(x, dy, module, lo, hi)
            done += n * U * (hi - lo)
        if module.has_unit_bias and layer % world == rank:
            grams[sl] += unit_bias_gram(dy, module)
    sent = 0
    if reduce_world > 1:  # ONE all-reduce for attention units and experts
        flat = torch.cat([grams.flatten()] + ([egrams.flatten().to(device)] if egrams is not None else []))
        dist.all_reduce(flat, group=group)
        sent = flat.numel() * flat.element_size()
        grams = flat[:grams.numel()].view_as(grams)
        if egrams is not None:
            egrams = flat[grams.numel():].view_as(egrams)
    grams = grams.double()
    nh = n_kind["heads"]
    return UnitProbe(grams[:nh], None if egrams is None else egrams.double(), split, sent, probe_comm, done, total,
                     mlp_grams=grams[nh:] if "mlp" in kinds else None)


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
