"""Ground truth for the mNTK tests: Θ^u = J_u J_uᵀ built row by row from parameter gradients of each f_i.

O(n) backward passes through the model — only for tiny models. Model-agnostic: any model whose units
``mat_ds.core.units.find_units`` lists, any ``probe_fn``. Not library code: the library never builds a Jacobian.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from mat_ds.core.units import ModelUnits


def _jacobian_rows(model, params: list, batch: dict, probe_fn) -> tuple[int, list]:
    """Rows [i][param] of d f_i / d param for every probe sample i (zeros where a param does not reach f_i)."""
    model.eval()
    requires = [p.requires_grad for p in params]
    for p in params:  # frozen units too: the ground truth covers every unit
        p.requires_grad_(True)
    try:
        f = probe_fn(model, batch)
        rows = []
        for i in range(f.shape[0]):
            g = torch.autograd.grad(f[i], params, retain_graph=True, allow_unused=True)
            rows.append([torch.zeros_like(p) if gi is None else gi for gi, p in zip(g, params)])
    finally:
        for p, req in zip(params, requires):
            p.requires_grad_(req)
    return f.shape[0], rows


def explicit_head_grams(model, units: ModelUnits, batch: dict, probe_fn) -> torch.Tensor:
    """[n_attention_units, n, n] float64, in ``units.heads`` order (weights AND per-unit biases)."""
    params = [p for u in units.heads for p in u.params]
    n, rows = _jacobian_rows(model, params, batch, probe_fn)
    grams = torch.zeros(len(units.heads), n, n, dtype=torch.float64)
    k = 0
    for idx, unit in enumerate(units.heads):
        m = len(unit.params)
        J = torch.stack([torch.cat([rows[i][k + j].reshape(-1) for j in range(m)]) for i in range(n)]).double()
        grams[idx] = J @ J.t()
        k += m
    return grams


def explicit_expert_grams(model, units: ModelUnits, batch: dict, probe_fn) -> torch.Tensor:
    """[n_experts_total, n, n] float64, in ``units.experts`` order, identical on every rank.

    Every rank holds the same probe batch, so under expert parallelism the gradient an expert's owner receives for
    f_i is the sum over the ep_size identical copies of f_i (one per source rank): divided by ep_size. Every holder of
    an expert computes it; the all-reduce averages over its expert-data-parallel copies."""
    from mat_ds.core.experts import record_routes

    layers = units.moe_layers
    local = [(j, layer.global_index(i), list(ex.parameters()))
             for j, layer in enumerate(layers) for i, ex in enumerate(layer.local_experts())]
    flat = [p for _, _, ps in local for p in ps]
    with record_routes(layers):  # same probe-mode routing as the fast path (no token dropping)
        n, rows = _jacobian_rows(model, flat, batch, probe_fn)
    E = layers[0].num_experts
    grams = torch.zeros(len(layers) * E, n, n, dtype=torch.float64)
    k = 0
    for j, e, ps in local:
        J = torch.stack([torch.cat([rows[i][k + m].reshape(-1) for m in range(len(ps))]) for i in range(n)]).double()
        J = J / layers[j].ep_size
        grams[j * E + e] = J @ J.t()
        k += len(ps)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        copies = dist.get_world_size() // layers[0].ep_size
        dist.all_reduce(grams)
        grams /= copies
    return grams


def explicit_unit_grams(model, unit_list: list, batch: dict, probe_fn) -> torch.Tensor:
    """[len(unit_list), n, n] float64 for any units whose ``params`` this rank holds whole (heads, per-expert experts
    of converted HF MoE blocks, ...), in the given order. The model's routing is whatever its forward does (HF routers
    have no capacity limit, so nothing to switch off). Rank-local: every rank holding the params gets the same Gram."""
    params = [p for u in unit_list for p in u.params]
    n, rows = _jacobian_rows(model, params, batch, probe_fn)
    grams = torch.zeros(len(unit_list), n, n, dtype=torch.float64)
    k = 0
    for idx, unit in enumerate(unit_list):
        m = len(unit.params)
        J = torch.stack([torch.cat([rows[i][k + j].reshape(-1) for j in range(m)]) for i in range(n)]).double()
        grams[idx] = J @ J.t()
        k += m
    return grams
