"""Two ways to get a head-wise layer's per-unit Gram from its activations, and the cost model that picks one per layer.

For a linear y = x Wᵀ over T positions, sample i's weight gradient is G_i = Σ_t dy_itᵀ x_it (d_out × d_in) and
Θ_ij = <G_i, G_j>. Restricted to unit u (its output channels for split "out", its input channels for split "in"):

* **materialised** (``mntk.shard_unit_gram``): build the n per-sample gradients of one unit at a time
  (n·d_out·d_in / U numbers), then their Gram. Memory ~n·d_in·d_out/U floats at peak, charged twice for the GEMM's
  operand copies; FLOPs 2·n·T·d_in·d_out + 2·n²·d_in·d_out.
* **ghost** (``ghost_unit_gram``): ⟨G_i, G_j⟩ = Σ_{t,s} (x_it·x_js)(dy_it·dy_js) — the Gram of the nT positions'
  inputs, times the Gram of their output gradients restricted to the unit, summed over each (i, j) block of T×T
  positions. Nothing of size d_in·d_out exists. Memory 2·(nT)² floats (+ one activation slice); FLOPs 2·(nT)²·(d_in + d_out) + (nT)²·U.

The ghost form wins in FLOPs when positions are few and layers wide (fastDP's rule of thumb: 2T² ≤ d_in·d_out); in
memory the materialised form pays n·d_in·d_out/U per layer (a 7B model's QKV, d = 4096, 32 units, n = 16: 16·4096·
384·4 B ≈ 100 MB per unit; the whole layer's would be 3.2 GB) and the ghost form 2·(nT)² (T = 512: 0.5 GB). ``choose`` applies the cost model with the memory
bound ``mat.probe_memory_mb`` (both forms exceed it -> a one-line error at start-up, never an OOM mid-run).
Per-unit biases (split "out") add Σ_t dy_it restricted to the unit either way (``mntk.unit_bias_gram``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .headwise import HeadwiseLinear

FORMS = ("auto", "materialized", "ghost")


@dataclass(frozen=True)
class GramCost:
    """Peak extra memory (bytes, fp32) and FLOPs of one layer's per-unit Gram by each form."""

    materialized_bytes: int
    materialized_flops: int
    ghost_bytes: int
    ghost_flops: int

    def pick(self, limit_bytes: int) -> str:
        """The cheaper form in FLOPs among those within ``limit_bytes``; '' if neither fits."""
        fits = [(f, name) for name, b, f in (("materialized", self.materialized_bytes, self.materialized_flops),
                                            ("ghost", self.ghost_bytes, self.ghost_flops)) if b <= limit_bytes]
        return min(fits)[1] if fits else ""


def layer_cost(n: int, T: int, d_in: int, d_out: int, n_units: int) -> GramCost:
    """The cost model of the module docstring (fp32: 4 bytes a number)."""
    nT = n * T
    # Bytes are PEAKS (checked against /proc VmHWM by benchmarks/probe_cost.py): the materialised form holds ONE unit's
    # per-sample gradients (charged twice: the batched GEMM may copy its operands) and the activation slices it
    # indexes; the ghost form holds the shared and ONE reused per-unit (nT)² kernel plus one activation slice.
    return GramCost(materialized_bytes=4 * (2 * n * d_in * d_out // max(n_units, 1) + nT * (d_in + d_out)),
                    materialized_flops=2 * nT * d_in * d_out + 2 * n * n * d_in * d_out,
                    ghost_bytes=4 * (2 * nT * nT + nT * max(d_in, d_out)),
                    ghost_flops=2 * nT * nT * (d_in + d_out) + nT * nT * n_units)


def choose(module: HeadwiseLinear, n: int, T: int, form: str, limit_bytes: int) -> str:
    """The form to use for ``module`` ("materialized" or "ghost"); ``ValueError`` (one line) if none fits."""
    cost = layer_cost(n, T, module.d_in, module.d_out, module.n_units)
    if form == "auto":
        picked = cost.pick(limit_bytes)
        if not picked:
            raise ValueError(f"the mNTK probe of a {module.d_in}x{module.d_out} layer with n={n} samples of T={T} "
                             f"positions needs {min(cost.materialized_bytes, cost.ghost_bytes) / 2**20:.0f} MiB "
                             f"(materialized {cost.materialized_bytes / 2**20:.0f} MiB, ghost "
                             f"{cost.ghost_bytes / 2**20:.0f} MiB) > mat.probe_memory_mb={limit_bytes / 2**20:.0f}: "
                             f"lower mat.probe_samples or raise mat.probe_memory_mb")
        return picked
    needed = cost.materialized_bytes if form == "materialized" else cost.ghost_bytes
    if needed > limit_bytes:
        raise ValueError(f"mat.probe_gram={form!r} needs {needed / 2**20:.0f} MiB for a {module.d_in}x{module.d_out} "
                         f"layer (n={n}, T={T}) > mat.probe_memory_mb={limit_bytes / 2**20:.0f}: use 'auto', lower "
                         f"mat.probe_samples or raise mat.probe_memory_mb")
    return form


def ghost_unit_gram(x: torch.Tensor, dy: torch.Tensor, module: HeadwiseLinear) -> torch.Tensor:
    """Per-unit weight Gram [U, n, n] without per-sample gradients: Θ^u_ij = Σ_{t,s} (x_it·x_js)(dy_it^u·dy_js^u)
    for split "out" (unit u = output channels lay[u]); inputs and outputs swap roles for split "in"."""
    n, T = x.shape[:2]
    lay = module.unit_layout().to(x.device)
    shared, per_unit = (x, dy) if module.split == "out" else (dy, x)
    S = shared.reshape(n * T, -1)
    K_shared = S @ S.t()  # [nT, nT], the same for every unit
    out = torch.empty(module.n_units, n, n, dtype=x.dtype, device=x.device)
    K = torch.empty_like(K_shared)  # ONE per-unit kernel buffer, reused: two (nT)² matrices alive in all
    P = torch.empty(n, T, lay.shape[1], dtype=x.dtype, device=x.device)  # one unit's channels, reused
    for u in range(module.n_units):
        torch.index_select(per_unit, -1, lay[u], out=P)
        torch.mm(P.view(n * T, -1), P.view(n * T, -1).t(), out=K)
        K.mul_(K_shared)
        out[u] = K.view(n, T, n, T).sum(dim=(1, 3))
    return out
