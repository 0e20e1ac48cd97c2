"""Head-wise linear layers: one ``nn.Parameter`` per attention head, one GEMM per layer, weight gradients only for
trainable heads.

Why this shape:

* ZeRO's unit of gradient communication is the ``nn.Parameter``. A head that owns its own parameters can leave the
  gradient reduction entirely when it is frozen (``requires_grad_(False)``), which a slice of a fused QKV matrix cannot.
* Plain per-head ``nn.Linear`` + ``torch.cat`` would still compute every head's weight gradient inside cat's backward.
  ``HeadwiseLinearFn`` concatenates the weights for ONE forward GEMM, computes the input gradient through all heads
  (lower layers still need it), and computes weight gradients only for heads whose parameter requires grad — autograd
  tells us through ``ctx.needs_input_grad``, so ``requires_grad`` is the single source of truth for "frozen".
* ``record()`` lets the mNTK probe capture each layer's input X and output Y. For a linear map the per-sample weight
  gradient is dY_iᵀ X_i, so the mNTK Gram never needs a Jacobian w.r.t. parameters (see ``mat_ds/mntk.py``). Because only
  activations are used, the probe works identically on ZeRO-3 partitioned parameters.

Layouts. ``split="out"`` (QKV): head h owns rows [h·k, (h+1)·k) of the output, its parameter has shape [k, d_in].
``split="in"`` (attention output projection): head h owns input columns [h·k, (h+1)·k), parameter shape [d_out, k].
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn


class HeadwiseLinearFn(torch.autograd.Function):
    """y = x @ cat(weights)ᵀ with per-head weight gradients computed only for heads that require grad.

    ``weight_grads=False`` (the mNTK probe) computes no weight gradient at all: ``ctx.needs_input_grad`` is fixed at
    forward time, so a later ``autograd.grad`` w.r.t. activations only would otherwise still pay for every dW GEMM.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, split_dim: int, weight_grads: bool,  # type: ignore[override]
                *weights: torch.Tensor) -> torch.Tensor:
        w = torch.cat(weights, dim=split_dim)
        # Save the parameters themselves, not the concatenation: under ZeRO-3 they are re-gathered for backward instead
        # of keeping a full copy alive between forward and backward.
        ctx.save_for_backward(x, *weights)
        ctx.split_dim, ctx.weight_grads = split_dim, weight_grads
        return x @ w.t()

    @staticmethod
    def backward(ctx, dy: torch.Tensor):  # type: ignore[override]
        x, *weights = ctx.saved_tensors
        split_dim = ctx.split_dim
        need_w = ctx.needs_input_grad[3:] if ctx.weight_grads else [False] * len(weights)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = dy @ torch.cat(weights, dim=split_dim)
        grads: list[Optional[torch.Tensor]] = [None] * len(weights)
        active = [i for i, need in enumerate(need_w) if need]
        if active:
            x2 = x.reshape(-1, x.shape[-1])
            dy2 = dy.reshape(-1, dy.shape[-1])
            k = weights[0].shape[split_dim]  # width of one head along the split dimension
            if len(active) == len(weights):
                # Everything trains: one GEMM, then split (cheapest).
                dw = dy2.t() @ x2
                for i, part in enumerate(dw.split(k, dim=split_dim)):
                    grads[i] = part.contiguous()
            else:
                # Gather the active heads' slices so the weight gradient is still ONE GEMM, sized by active heads only.
                idx = torch.cat([torch.arange(i * k, (i + 1) * k, device=dy.device) for i in active])
                if split_dim == 0:
                    dw = dy2.index_select(1, idx).t() @ x2
                else:
                    dw = dy2.t() @ x2.index_select(1, idx)
                for i, part in zip(active, dw.split(k, dim=split_dim)):
                    grads[i] = part.contiguous()
        return (dx, None, None, *grads)


class HeadwiseLinear(nn.Module):
    """A bias-free linear layer whose weight is stored as ``n_heads`` separate parameters ``w0 .. w{H-1}``.

    Parameters are registered directly on this module (not in a ParameterList) so ZeRO-3's pre-forward hook, which
    gathers ``module.parameters(recurse=False)``, fetches them when this module runs.
    """

    def __init__(self, d_in: int, d_out: int, n_heads: int, split: str, init_std: float = 0.02):
        super().__init__()
        if split not in ("out", "in"):
            raise ValueError(f"split must be 'out' or 'in', got {split!r}")
        total = d_out if split == "out" else d_in
        if total % n_heads:
            raise ValueError(f"{total} is not divisible by n_heads={n_heads}")
        self.d_in, self.d_out, self.n_heads, self.split = d_in, d_out, n_heads, split
        self.split_dim = 0 if split == "out" else 1
        k = total // n_heads
        shape = (k, d_in) if split == "out" else (d_out, k)
        for h in range(n_heads):
            w = nn.Parameter(torch.empty(shape))
            nn.init.normal_(w, std=init_std)
            self.register_parameter(f"w{h}", w)
        self.recorder: Optional[list] = None  # set by mat_ds.mntk.record_activations

    def head_params(self) -> list[nn.Parameter]:
        return [getattr(self, f"w{h}") for h in range(self.n_heads)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probing = self.recorder is not None
        y = HeadwiseLinearFn.apply(x, self.split_dim, not probing, *self.head_params())
        if probing:
            self.recorder.append((self, x.detach(), y))
        return y

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}, n_heads={self.n_heads}, split={self.split}"


def per_sample_head_grads(module: HeadwiseLinear, x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Per-sample, per-head weight gradients from activations: [n, H, P_head] with P_head = params of one head.

    For y = x Wᵀ summed over positions t, dL_i/dW = Σ_t dy_{i,t} ⊗ x_{i,t} = dY_iᵀ X_i, so the gradient of every head of
    every sample is one batched GEMM over the activations. ``x``: [n, T, d_in], ``dy``: [n, T, d_out].
    """
    n, H = x.shape[0], module.n_heads
    g = torch.einsum("nto,nti->noi", dy, x)  # [n, d_out, d_in]
    if module.split == "out":
        return g.reshape(n, H, -1)  # head h = rows [h·k, (h+1)·k): contiguous after the reshape
    k = module.d_in // H
    return g.reshape(n, module.d_out, H, k).permute(0, 2, 1, 3).reshape(n, H, -1)


def init_std_for_residual(n_layer: int, std: float = 0.02) -> float:
    """GPT-2's scaled init for projections that write into the residual stream."""
    return std / math.sqrt(2 * n_layer)
