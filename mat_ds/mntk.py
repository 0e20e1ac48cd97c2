"""Modular neural tangent kernels (mNTK) of attention heads and MoE experts, and their principal eigenvalues λmax.

For head l, Θ^l = J_l J_lᵀ (n × n) where row i of J_l is the gradient of the scalar output f_i of probe sample i w.r.t.
head l's parameters. We never build J_l from parameters:

1. one forward of the probe batch with every ``HeadwiseLinear`` recording its input X and output Y;
2. one ``torch.autograd.grad(Σ_i f_i, [Y...])``. Samples are independent in eval mode (no dropout, no cross-sample
   ops), so the rows of dΣf/dY belonging to sample i are exactly df_i/dY_i. Gradients are taken w.r.t. activations
   only: no parameter ``.grad`` is touched and no ZeRO reduce hook fires;
3. per-sample per-head weight gradients G_i = dY_iᵀ X_i from activations (``shard_head_gram``; the unsplit form is
   ``headwise.per_sample_head_grads``), and Θ^l_ij = <G_i^l, G_j^l> summed over the head's QKV and
   output-projection parameters;
4. the work is split across the ranks of ``group`` and ONE all-reduce (sum) of the [L, H, n, n] float32 tensor
   completes it: O(L·H·n²) numbers per refresh, never a gather of parameters or Jacobians. Two splits:

   * ``split="layer"`` (ZeRO 0/1/2, where every rank holds every weight): rank r handles layers l ≡ r mod world;
   * ``split="shard"`` (ZeRO-3): Θ^l_ij = Σ_e G_i[e] G_j[e] is a sum over parameter elements e, so it splits over
     any disjoint cover of the elements. The cover used is ZeRO-3's own: DeepSpeed partitions each FLATTENED
     parameter into world equal chunks of ``ps = ceil(numel / world)`` (the last one padded), and rank r owns flat
     elements [r·ps, min((r+1)·ps, numel)). Each rank computes only the rows of dY_iᵀ X_i its chunk touches
     (``shard_head_gram``), ~1/world of the work, and sums its partial Grams over all heads of all layers.
   ``split="auto"`` (default) picks "shard" when the head parameters are ZeRO-3 partitioned, else "layer".

   The activations themselves are not split: every rank runs the probe's forward and activation backward on the
   whole (identical) probe batch, and under ZeRO-3 that forward/backward all-gathers parameters exactly like a
   training forward does. ``probe_modules`` reports both costs separately (``ModuleProbe``): the Gram all-reduce and the
   DeepSpeed traffic the probe's forward/backward caused.

Scalar output f_i (``MATConfig.probe_output``):
* ``"loss"`` (default): the sample's mean training loss. Θ is then the Gram of per-sample loss gradients, the kernel
  that governs how one sample's update moves another's loss;
* ``"logit_projection"``: f_i = mean over the sample's target positions t of <r_t, logits_{i,t}>, with fixed random
  unit vectors r_t (seeded), a one-sample sketch of the output-space NTK.

Experts (Switch MLPs, ``mat_ds/moe.py``): the same activation trick per expert linear, with the routing recovered from
the gates (``expert_grams``): Θ^e = S K Sᵀ, S the slot -> sample indicator of expert e's capacity buffer, K the
slot kernel (dy dyᵀ) ⊙ (x xᵀ + 1). Same probe pass and same single all-reduce as the heads (``probe_modules(...,
experts=True)``); expert parallelism included.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from .headwise import HeadwiseLinear
from .model import Transformer


@contextlib.contextmanager
def record_activations(model: Transformer) -> Iterator[list]:
    """Make every head-wise linear append (module, X, Y) to the yielded list while the context is open."""
    records: list = []
    layers = [m for _, m in model.headwise_layers()]
    for m in layers:
        m.recorder = records
    try:
        yield records
    finally:
        for m in layers:
            m.recorder = None


def probe_outputs(model: Transformer, batch: dict, probe_output: str, seed: int = 0) -> torch.Tensor:
    """f_i for each probe sample, shape [n]. The model must be in eval mode (samples independent)."""
    if probe_output == "loss":
        return model(batch["input_ids"], batch["labels"], per_sample=True)
    if probe_output != "logit_projection":
        raise ValueError(f"unknown probe_output {probe_output!r}")
    logits = model.logits(batch["input_ids"]).float()
    targets = model.token_targets(batch["labels"])
    gen = torch.Generator().manual_seed(seed)
    r = torch.randn(logits.shape[1], logits.shape[2], generator=gen, dtype=logits.dtype)
    r = (r / r.norm(dim=-1, keepdim=True)).to(logits.device)
    valid = (targets != -100).to(logits.dtype)
    proj = (logits * r).sum(-1)  # [n, T]
    return (proj * valid).sum(1) / valid.sum(1).clamp_min(1)


SPLITS = ("auto", "layer", "shard")


def is_zero3_partitioned(p: torch.nn.Parameter) -> bool:
    """True for a parameter that ZeRO-3 has partitioned (it carries its local chunk in ``ds_tensor``)."""
    return getattr(p, "ds_tensor", None) is not None


def zero3_owned_range(p: torch.nn.Parameter) -> tuple[int, int, int]:
    """(lo, hi, world): the flat elements [lo, hi) of ``p`` held in this rank's ZeRO-3 chunk, and the partition size.

    Mirrors ``deepspeed.runtime.zero.partition_parameters.Init._partition_param`` (0.19.8): the flattened parameter
    is padded to a multiple of the partition world and cut into equal chunks of ``ds_tensor.ds_numel`` elements;
    rank r of ``p.ds_process_group`` holds [r·ps, (r+1)·ps), of which only the part below ``ds_numel`` is real
    (the rest is padding; a rank may own nothing at all when numel < world). tests/scripts/zero3_gram_check.py checks
    this against ``deepspeed.zero.GatheredParameters``.
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


def head_param_shape(split: str, d_in: int, d_out: int, n_heads: int) -> tuple[int, int]:
    """(rows, cols) of ONE head's parameter of a head-wise linear (see the layouts in ``mat_ds/headwise.py``)."""
    if split == "out":
        return d_out // n_heads, d_in
    if split == "in":
        return d_out, d_in // n_heads
    raise ValueError(f"split must be 'out' or 'in', got {split!r}")


def shard_head_gram(x: torch.Tensor, dy: torch.Tensor, split: str, n_heads: int, lo: int, hi: int) -> torch.Tensor:
    """Partial Gram Σ_{e in [lo, hi)} G_i^h[e] G_j^h[e] of every head h over one flat element range: [H, n, n].

    ``x`` [n, T, d_in] and ``dy`` [n, T, d_out] are a head-wise linear's input and output gradient, ``split`` its
    layout ("out": head h's parameter is rows [h·k, (h+1)·k) of W, shape [k, d_in]; "in": columns [h·k, (h+1)·k),
    shape [d_out, k]). [lo, hi) indexes the row-major flattening of ONE head's parameter and is the same for every
    head, because all heads of a layer have the same shape and hence the same ZeRO-3 chunking. [0, rows·cols) gives
    the full Gram; summing over the chunks of any disjoint cover gives the full Gram too.

    Only the parameter rows the range touches are computed (per-sample G_i = dY_iᵀ X_i restricted to those rows, at
    most two of them partial), so a rank owning 1/world of the elements does ~1/world of the GEMM work.
    """
    n, d_in, d_out = x.shape[0], x.shape[-1], dy.shape[-1]
    rows, cols = head_param_shape(split, d_in, d_out, n_heads)
    if not 0 <= lo <= hi <= rows * cols:
        raise ValueError(f"range [{lo}, {hi}) outside a head parameter of {rows}x{cols} elements")
    if hi == lo:  # this rank owns nothing of the parameter (numel < world, or the padded tail)
        return torch.zeros(n_heads, n, n, dtype=x.dtype, device=x.device)
    r0, r1 = lo // cols, (hi - 1) // cols + 1  # parameter rows [r0, r1) hold the range
    if split == "out":
        # Row r of head h is output channel h·k + r: pick those channels of dY for every head, X stays whole.
        k = rows
        idx = (torch.arange(n_heads, device=dy.device)[:, None] * k + torch.arange(r0, r1, device=dy.device)).flatten()
        g = torch.einsum("nto,nti->noi", dy.index_select(-1, idx), x)  # [n, H·nr, d_in], head-major
        g = g.reshape(n, n_heads, (r1 - r0) * cols)
    else:
        # Row r of every head is output channel r; head h owns input columns [h·k, (h+1)·k).
        g = torch.einsum("nto,nti->noi", dy[..., r0:r1], x)  # [n, nr, d_in]
        g = g.reshape(n, r1 - r0, n_heads, cols).transpose(1, 2).reshape(n, n_heads, (r1 - r0) * cols)
    g = g[:, :, lo - r0 * cols:hi - r0 * cols]  # drop the parts of the partial first/last rows outside the range
    return torch.einsum("nhp,mhp->hnm", g, g)


def resolve_split(model: Transformer, split: str = "auto") -> str:
    """``"auto"`` -> ``"shard"`` if the head parameters are ZeRO-3 partitioned, else ``"layer"``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if split != "auto":
        return split
    heads = [p for _, m in model.headwise_layers() for p in m.head_params()]
    return "shard" if any(is_zero3_partitioned(p) for p in heads) else "layer"


def _owned_range(module: HeadwiseLinear, layer: int, split: str, rank: int, world: int) -> tuple[int, int]:
    """The flat range [lo, hi) of each head parameter of ``module`` whose Gram terms this rank computes."""
    rows, cols = head_param_shape(module.split, module.d_in, module.d_out, module.n_heads)
    params = module.head_params()
    if split == "shard" and is_zero3_partitioned(params[0]):
        ranges = {zero3_owned_range(p) for p in params}
        if len(ranges) != 1:  # cannot happen for equal-shaped heads in one group; never sum a wrong cover
            raise RuntimeError(f"heads of one layer are chunked differently by ZeRO-3: {sorted(ranges)}")
        lo, hi, part_world = ranges.pop()
        if part_world != world:
            # e.g. MiCS/hpZ-style sub-group partitioning: summing over `group` would count elements several times.
            raise ValueError(f"ZeRO-3 partitions head parameters over {part_world} ranks but the Gram is reduced over "
                             f"{world}; pass the partition group as `group`, or use split='layer'")
        return lo, hi
    # split="layer", or a head-wise layer that is not partitioned: the whole layer goes to one rank.
    return (0, rows * cols) if layer % world == rank else (0, 0)


def _comm_snapshot() -> Optional[dict[str, int]]:
    """DeepSpeed comms-logger bytes per op, or None when the logger is off (so "not measured" never reads as 0)."""
    try:
        from deepspeed.comm import comm as ds_comm
    except ImportError:  # pragma: no cover - deepspeed is a hard dependency of mat_ds
        return None
    logger = getattr(ds_comm, "comms_logger", None)
    if logger is None or not logger.enabled:
        return None
    from .freezing import comm_bytes_snapshot
    return comm_bytes_snapshot()


@dataclass
class ModuleProbe:
    """One mNTK refresh: the Grams and what it cost in communication and per-sample-gradient work on this rank."""

    grams: torch.Tensor  # heads: [n_layer, n_head, n, n] float64 (float32 accuracy), identical on every rank
    expert_grams: Optional[torch.Tensor]  # experts: [n_moe_layers, num_experts, n, n], None unless asked for
    split: str  # "layer" or "shard", as resolved from "auto"
    # Message bytes of the ONE Gram all-reduce ((L·H + moe_layers·E)·n²·4, fp32), counted like DeepSpeed's comms logger counts a
    # message; 0 on a single rank, where nothing is sent. It goes through torch.distributed directly, so it is NOT
    # included in the comms logger's numbers (and never pollutes the trainer's gradient-traffic metrics).
    gram_allreduce_bytes: int
    # DeepSpeed traffic (comms logger, bytes per op on this rank) caused by the probe's forward + activation backward:
    # ZeRO-3's parameter all-gathers, as in any ZeRO-3 forward. None when the comms logger is off (not measured).
    probe_comm_bytes: Optional[dict[str, int]]
    grad_numel: int  # per-sample weight-gradient entries (n·params) this rank computed
    grad_numel_unsplit: int  # ... and what one rank computing all heads would compute

    def lambda_max(self) -> torch.Tensor:
        """λmax per head, float64 [n_layer, n_head]."""
        return lambda_max(self.grams)

    def expert_lambda_max(self) -> torch.Tensor:
        """λmax per expert, float64 [n_moe_layers, num_experts]."""
        if self.expert_grams is None:
            raise ValueError("this probe did not measure experts (probe_modules(..., experts=True))")
        return lambda_max(self.expert_grams)

    def metrics(self) -> dict[str, float]:
        """Scalars for the trainer's log."""
        out: dict[str, float] = {"mat/refresh_comm_bytes": self.gram_allreduce_bytes}
        if self.probe_comm_bytes is not None:
            out["mat/probe_comm_bytes"] = sum(self.probe_comm_bytes.values())
        return out


def probe_modules(model: Transformer, batch: dict, probe_output: str = "loss", seed: int = 0, group=None,
                  split: str = "auto", experts: bool = False) -> ModuleProbe:
    """Θ for every head (and, with ``experts``, every Switch expert) plus the refresh's communication and work, from
    ONE probe forward and ONE activation backward (see the module docstring for the method).

    Every rank of ``group`` must call this with the same probe batch (one collective per call, in the same order).
    Experts are reduced over all ranks, so ``experts=True`` needs the default (world) group.
    """
    from .moe import record_routes

    if experts and group is not None:
        raise ValueError("experts=True reduces over the world group; do not pass a sub-group")
    cfg = model.cfg
    n = batch["input_ids"].shape[0]
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank(group) if distributed else 0
    world = dist.get_world_size(group) if distributed else 1
    split = resolve_split(model, split)

    was_training = model.training
    model.eval()
    comm_before = _comm_snapshot()
    try:
        with torch.enable_grad(), record_activations(model) as records, \
                (record_routes(model) if experts else contextlib.nullcontext([])) as layers:
            f = probe_outputs(model, batch, probe_output, seed)
            outputs = [y for (_, _, y) in records]
            expert_outputs = [y for layer in layers for recs in layer.routes["linears"].values() for (_, y, _) in recs]
            grads = torch.autograd.grad(f.sum(), outputs + expert_outputs, allow_unused=True)
            # the routes live only inside record_routes: fold them into Grams here
            egrams = _expert_partial_grams(layers, grads[len(outputs):], batch["input_ids"].shape) if layers else None
            grads = grads[:len(outputs)]
    finally:
        model.train(was_training)
    comm_after = _comm_snapshot()
    probe_comm = None
    if comm_before is not None and comm_after is not None:
        probe_comm = {op: b - comm_before.get(op, 0) for op, b in comm_after.items() if b - comm_before.get(op, 0)}

    layer_of = {id(m): i for i, m in model.headwise_layers()}
    # Per-sample gradients and Grams in float32 (bf16/fp16 activations are upcast): relative error ~1e-6 on λmax,
    # far below the 1e-4 the policy needs, at a fraction of float64's cost. The eigen-solve runs in float64.
    grams = torch.zeros(cfg.n_layer, cfg.n_head, n, n, dtype=torch.float32, device=batch["input_ids"].device)
    done = total = 0
    for (module, x, _), dy in zip(records, grads):
        layer = layer_of[id(module)]
        rows, cols = head_param_shape(module.split, module.d_in, module.d_out, module.n_heads)
        total += n * module.n_heads * rows * cols
        lo, hi = _owned_range(module, layer, split, rank, world)
        if hi == lo or dy is None:  # nothing owned here (dy None cannot happen for a connected model: keep Θ = 0)
            continue
        grams[layer] += shard_head_gram(x.float(), dy.float(), module.split, module.n_heads, lo, hi)
        done += n * module.n_heads * (hi - lo)
    sent = 0
    if world > 1:  # ONE all-reduce for heads and experts
        flat = torch.cat([grams.flatten()] + ([egrams.flatten()] if egrams is not None else []))
        dist.all_reduce(flat, group=group)
        sent = flat.numel() * flat.element_size()
        grams = flat[:grams.numel()].view_as(grams)
        if egrams is not None:
            egrams = flat[grams.numel():].view_as(egrams)
    return ModuleProbe(grams.double(), None if egrams is None else egrams.double(), split, sent, probe_comm, done,
                       total)


def head_grams(model: Transformer, batch: dict, probe_output: str = "loss", seed: int = 0,
               group=None, split: str = "auto") -> torch.Tensor:
    """Θ^l for every head: [n_layer, n_head, n, n] (float64 dtype, float32 accuracy), identical on every rank."""
    return probe_modules(model, batch, probe_output, seed, group, split).grams


def lambda_max(grams: torch.Tensor) -> torch.Tensor:
    """Principal eigenvalue of each symmetric PSD Gram; [..., n, n] -> [...] (float64)."""
    sym = 0.5 * (grams + grams.transpose(-1, -2))  # exact symmetry for eigvalsh
    return torch.linalg.eigvalsh(sym)[..., -1]


def head_lambda_max(model: Transformer, batch: dict, probe_output: str = "loss", seed: int = 0,
                    group=None, split: str = "auto") -> torch.Tensor:
    """λmax for every head, float64 [n_layer, n_head]. ``probe_modules`` also reports the refresh's communication."""
    return lambda_max(head_grams(model, batch, probe_output, seed, group, split))


def explicit_head_grams(model: Transformer, batch: dict, probe_output: str = "loss", seed: int = 0) -> torch.Tensor:
    """Ground truth for tests: Θ^l = J_l J_lᵀ with J_l built row by row from parameter gradients of each f_i.

    O(n) backward passes — only for tiny models. Returns [n_layer, n_head, n, n] like ``head_grams``.
    """
    cfg = model.cfg
    heads = model.head_modules()
    params = [p for head in heads for p in head]
    model.eval()
    f = probe_outputs(model, batch, probe_output, seed)
    n = f.shape[0]
    rows = []
    for i in range(n):
        g = torch.autograd.grad(f[i], params, retain_graph=True, allow_unused=True)
        g = [torch.zeros_like(p) if gi is None else gi for gi, p in zip(g, params)]
        rows.append(g)
    grams = torch.zeros(cfg.n_layer, cfg.n_head, n, n, dtype=torch.float64)
    for idx, head in enumerate(heads):
        lo = sum(len(h) for h in heads[:idx])
        J = torch.stack([torch.cat([rows[i][lo + j].reshape(-1) for j in range(len(head))]) for i in range(n)])
        J = J.double()
        grams[idx // cfg.n_head, idx % cfg.n_head] = J @ J.t()
    return grams


# ----------------------------------------------------------------------------------------------------------------------
# Experts (Switch MLPs, mat_ds/moe.py)
# ----------------------------------------------------------------------------------------------------------------------
def _linear_slot_kernel(x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """K[c, c'] = <dW_c, dW_c'> + <db_c, db_c'> for the rank-one per-slot gradients of y = x Wᵀ + b:
    dW_c = dy_c ⊗ x_c, db_c = dy_c, so K = (dy dyᵀ) ⊙ (x xᵀ + 1)."""
    return (dy @ dy.t()) * (x @ x.t() + 1.0)


def _expert_partial_grams(layers: list, grads, shape: tuple[int, int]) -> torch.Tensor:
    """This rank's share of Θ^e for every expert of every Switch layer, float32 [n_moe_layers, E, n, n] (zeros for
    experts another rank computes). ``grads``: d(Σf)/dY of every recorded expert linear, in ``record_routes`` order.

    Each slot of an expert's capacity buffer holds one token, and each token belongs to one sample, so the per-sample
    gradient of expert e is G_i = Σ_{slots c of sample i} g_c with g_c the slot's rank-one gradient. Hence
    Θ^e = S K Sᵀ with S the [n, C] slot->sample indicator and K the slot kernel of ``_linear_slot_kernel`` summed over
    the expert's linears: exact, and no per-sample gradient is materialised. The routing (which slot holds which
    sample's token, also when the expert lives on another expert-parallel rank) comes from ``moe.record_routes``.

    Work split: expert e of Switch layer j is computed by ONE rank among those holding it (its expert-data-parallel
    group member with index (j·E + e) mod group size); the caller's all-reduce over all ranks completes the tensor.
    """
    from .moe import expert_data_parallel_group, slot_samples

    n, T = shape
    distributed = dist.is_available() and dist.is_initialized()
    E = layers[0].num_experts
    grams = torch.zeros(len(layers), E, n, n, dtype=torch.float32)
    grads = iter(grads)
    for j, layer in enumerate(layers):
        for i, recs in layer.routes["linears"].items():
            e = layer.global_index(i)
            kern = None
            for (x, y, _lin) in recs:
                dy = next(grads)
                dy = torch.zeros_like(y) if dy is None else dy
                # [ep, C, d]: keep the slab this rank sent to itself (its own tokens, see moe.py).
                xs = x.reshape(layer.ep_size, -1, x.shape[-1])[layer.ep_rank].float()
                dys = dy.reshape(layer.ep_size, -1, dy.shape[-1])[layer.ep_rank].float()
                kern = _linear_slot_kernel(xs, dys) if kern is None else kern + _linear_slot_kernel(xs, dys)
            if kern is None:
                continue
            if distributed:
                edp = expert_data_parallel_group(layer)
                if (j * E + e) % dist.get_world_size(edp) != dist.get_rank(edp):
                    continue  # another holder of this expert computes it
            slots = slot_samples(layer.routes, e, T)
            S = torch.zeros(n, slots.numel(), dtype=torch.float32)
            used = slots >= 0
            S[slots[used], used.nonzero().flatten()] = 1.0
            grams[j, e] = S @ kern @ S.t()
    return grams


def expert_grams(model: torch.nn.Module, batch: dict, probe_output: str = "loss", seed: int = 0) -> torch.Tensor:
    """Θ^e for every expert of every Switch layer: [n_moe_layers, num_experts, n, n] (float64), same on every rank
    (see ``_expert_partial_grams``; computed in the same pass as the heads' Grams)."""
    return probe_modules(model, batch, probe_output, seed, experts=True).expert_grams


def explicit_expert_grams(model: torch.nn.Module, batch: dict, probe_output: str = "loss",
                          seed: int = 0) -> torch.Tensor:
    """Ground truth for tests: Θ^e = J_e J_eᵀ from n parameter-gradient backward passes of the f_i.

    Every rank holds the same probe batch, so under expert parallelism the gradient an expert's owner receives for
    f_i is the sum over the ep_size identical copies of f_i (one per source rank): we divide by ep_size. Returns
    [n_moe_layers, num_experts, n, n] (float64), all-reduced so every rank has every expert."""
    from .moe import record_routes, switch_layers

    distributed = dist.is_available() and dist.is_initialized()
    model.eval()
    experts = [p for layer in switch_layers(model) for ex in layer.local_experts() for p in ex.parameters()]
    requires = [p.requires_grad for p in experts]
    for p in experts:  # frozen experts too: the ground truth covers every expert
        p.requires_grad_(True)
    with record_routes(model) as layers:  # same probe-mode routing as expert_grams (no token dropping)
        f = probe_outputs(model, batch, probe_output, seed)
    n = f.shape[0]
    E = layers[0].num_experts
    grams = torch.zeros(len(layers), E, n, n, dtype=torch.float64)
    params = [(j, layer.global_index(i), list(ex.parameters()))
              for j, layer in enumerate(layers) for i, ex in enumerate(layer.local_experts())]
    flat = [p for _, _, ps in params for p in ps]
    rows = []
    for i in range(n):
        g = torch.autograd.grad(f[i], flat, retain_graph=True, allow_unused=True)
        rows.append([torch.zeros_like(p) if gi is None else gi for gi, p in zip(g, flat)])
    for p, req in zip(experts, requires):
        p.requires_grad_(req)
    k = 0
    for j, e, ps in params:
        J = torch.stack([torch.cat([rows[i][k + m].reshape(-1) for m in range(len(ps))]) for i in range(n)]).double()
        J = J / layers[j].ep_size
        grams[j, e] = J @ J.t()
        k += len(ps)
    if distributed and dist.get_world_size() > 1:
        # every holder of an expert computed it: average over its expert-data-parallel copies
        copies = dist.get_world_size() // layers[0].ep_size
        dist.all_reduce(grams)
        grams /= copies
    return grams

