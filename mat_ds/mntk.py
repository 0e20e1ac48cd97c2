"""Modular neural tangent kernels (mNTK) of attention heads and their principal eigenvalues λmax.

For head l, Θ^l = J_l J_lᵀ (n × n) where row i of J_l is the gradient of the scalar output f_i of probe sample i w.r.t.
head l's parameters. We never build J_l from parameters:

1. one forward of the probe batch with every ``HeadwiseLinear`` recording its input X and output Y;
2. one ``torch.autograd.grad(Σ_i f_i, [Y...])``. Samples are independent in eval mode (no dropout, no cross-sample
   ops), so the rows of dΣf/dY belonging to sample i are exactly df_i/dY_i. Gradients are taken w.r.t. activations
   only: no parameter ``.grad`` is touched and no ZeRO reduce hook fires;
3. per-sample per-head weight gradients G_i = dY_iᵀ X_i from activations (``per_sample_head_grads``), and
   Θ^l_ij = <G_i^l, G_j^l> summed over the head's QKV and output-projection parameters;
4. the work is split across data-parallel ranks by layer (rank r handles layers l ≡ r mod world), every rank fills its
   layers of one [L, H, n, n] tensor and ONE all-reduce (sum) completes it. That is O(L·H·n²) numbers per refresh,
   never a gather of parameters or Jacobians, and it works unchanged on ZeRO-3 partitioned weights.

Scalar output f_i (``MATConfig.probe_output``):
* ``"loss"`` (default): the sample's mean training loss. Θ is then the Gram of per-sample loss gradients, the kernel
  that governs how one sample's update moves another's loss;
* ``"logit_projection"``: f_i = mean over the sample's target positions t of <r_t, logits_{i,t}>, with fixed random
  unit vectors r_t (seeded), a one-sample sketch of the output-space NTK.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.distributed as dist

from .headwise import per_sample_head_grads
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


def head_grams(model: Transformer, batch: dict, probe_output: str = "loss", seed: int = 0,
               group=None) -> torch.Tensor:
    """Θ^l for every head: [n_layer, n_head, n, n] (float64 dtype, float32 accuracy), identical on every rank."""
    cfg = model.cfg
    n = batch["input_ids"].shape[0]
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank(group) if distributed else 0
    world = dist.get_world_size(group) if distributed else 1

    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad(), record_activations(model) as records:
            f = probe_outputs(model, batch, probe_output, seed)
            outputs = [y for (_, _, y) in records]
            grads = torch.autograd.grad(f.sum(), outputs, allow_unused=True)
    finally:
        model.train(was_training)

    layer_of = {id(m): i for i, m in model.headwise_layers()}
    # Per-sample gradients and Grams in float32 (bf16/fp16 activations are upcast): relative error ~1e-6 on λmax,
    # far below the 1e-4 the policy needs, at a fraction of float64's cost. The eigen-solve runs in float64.
    grams = torch.zeros(cfg.n_layer, cfg.n_head, n, n, dtype=torch.float32, device=batch["input_ids"].device)
    for (module, x, _), dy in zip(records, grads):
        layer = layer_of[id(module)]
        if layer % world != rank:
            continue  # another rank owns this layer's share of the work
        if dy is None:  # cannot happen for a connected model; keep Θ = 0 rather than crash
            continue
        g = per_sample_head_grads(module, x.float(), dy.float())  # [n, H, P]
        grams[layer] += torch.einsum("nhp,mhp->hnm", g, g)
    if world > 1:
        dist.all_reduce(grams, group=group)
    return grams.double()


def lambda_max(grams: torch.Tensor) -> torch.Tensor:
    """Principal eigenvalue of each symmetric PSD Gram; [..., n, n] -> [...] (float64)."""
    sym = 0.5 * (grams + grams.transpose(-1, -2))  # exact symmetry for eigvalsh
    return torch.linalg.eigvalsh(sym)[..., -1]


def head_lambda_max(model: Transformer, batch: dict, probe_output: str = "loss", seed: int = 0,
                    group=None) -> torch.Tensor:
    """λmax for every head, float64 [n_layer, n_head]."""
    return lambda_max(head_grams(model, batch, probe_output, seed, group))


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
