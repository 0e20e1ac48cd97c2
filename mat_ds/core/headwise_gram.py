"""Gram of head-wise units (kinds "heads" and "mlp") from one recorded probe pass: the ``HeadwiseSource`` of
``sources.py``, and the per-sample-gradient math it uses (``mntk.py``'s docstring derives it).

Every ``HeadwiseLinear`` records its input X and output Y during the probe forward; with dY = d(Σ_i f_i)/dY, unit u's
per-sample weight gradient is G_i = dY_iᵀ X_i restricted to its channels, and Θ^u_ij = <G_i, G_j> summed over the
unit's parameters in all head-wise linears of its layer (bias entries included). Two work splits (``WorkSplit.split``):
whole layers per rank (``"layer"``, l ≡ rank mod world) or, under ZeRO-3, each rank the flat elements of its own
parameter chunk (``"shard"``); a layer whose ``ghost.choose`` says "ghost" is computed whole from activation Grams by
rank l mod world.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from . import ghost
from .headwise import HeadwiseLinear
from .sources import WorkSplit
from .topology import rank_in, size_of
from .units import ModelUnits

SPLITS = ("auto", "layer", "shard")


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
        rank, world = rank_in(pg), size_of(pg)
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


class HeadwiseSource:
    """The head-wise linears of one kind ("heads" or "mlp") as a unit source (``sources.UnitSource``).

    Rows of its Gram block: units by layer (sorted tag), then unit index; under tensor parallelism ALL TP ranks'
    units (``units_total``): each rank fills the rows of the units it holds (``unit_offset``)."""

    def __init__(self, kind: str, by_layer: dict[int, list[HeadwiseLinear]]):
        self.kind = kind
        self.layers = [m for layer in sorted(by_layer) for m in by_layer[layer]]
        self.offset: dict[int, int] = {}  # layer tag -> first row of its units
        start = 0
        for layer in sorted(by_layer):
            self.offset[layer] = start
            start += by_layer[layer][0].units_total
        self._size = start
        self._records: list = []
        self.done = self.total = 0  # per-sample weight-gradient entries computed here / by one rank doing all

    def size(self) -> int:
        return self._size

    @contextlib.contextmanager
    def recording(self) -> Iterator[list]:
        with record_activations(self.layers) as records:
            self._records = records
            yield records

    def outputs(self) -> list[torch.Tensor]:
        return [y for (_, _, y) in self._records]

    def partial_grams(self, grads, shape: tuple[int, int], work: WorkSplit, device) -> torch.Tensor:
        n = shape[0]
        grams = torch.zeros(self._size, n, n, dtype=torch.float32, device=device)
        rank, world = work.rank, work.world
        self.done = self.total = 0
        for (module, x, _), dy in zip(self._records, grads):
            layer, U = int(module.layer), module.n_units
            base = self.offset[layer] + module.unit_offset  # this rank's first unit
            rows, cols = unit_param_shape(module)
            self.total += n * U * rows * cols
            if dy is None:  # this output does not reach f (cannot happen for a connected model): Θ contribution 0
                continue
            x, dy = x.float(), dy.float()
            sl = slice(base, base + U)
            mine = layer % world == rank
            if ghost.choose(module, n, x.shape[1], work.gram, work.memory_limit_bytes) == "ghost":
                if mine:
                    grams[sl] += ghost.ghost_unit_gram(x, dy, module)
            else:
                lo, hi = _owned_range(module, layer, work.split, rank, world)
                if hi > lo:
                    grams[sl] += shard_unit_gram(x, dy, module, lo, hi)
                    self.done += n * U * (hi - lo)
            if module.has_unit_bias and mine:
                grams[sl] += unit_bias_gram(dy, module)
        self._records = []
        return grams
