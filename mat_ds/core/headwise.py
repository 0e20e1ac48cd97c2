"""Head-wise linear layers: one ``nn.Parameter`` per attention unit, one GEMM per layer, weight gradients only for
trainable units. This is the ONE thing a model must contain for MAT to select its attention units.

Why this shape:

* ZeRO's unit of gradient communication is the ``nn.Parameter``. A unit that owns its own parameters can leave the
  gradient reduction entirely when it is frozen (``requires_grad_(False)``), which a slice of a fused matrix cannot.
* Plain per-unit ``nn.Linear`` + ``torch.cat`` would still compute every unit's weight gradient inside cat's backward.
  ``HeadwiseLinearFn`` assembles the weight for ONE forward GEMM, computes the input gradient through all units
  (lower layers still need it), and weight gradients only for units whose parameters require grad — autograd tells us
  through ``ctx.needs_input_grad``, so ``requires_grad`` is the single source of truth for "frozen".
* ``recorder`` lets the mNTK probe capture each layer's input X and output Y. For a linear map the per-sample weight
  gradient is dY_iᵀ X_i, so the mNTK Gram never needs a Jacobian w.r.t. parameters (``mat_ds/core/mntk.py``). Only
  activations are used, so the probe works identically on ZeRO-3 partitioned parameters.

A *unit* is what MAT freezes as one: an attention head, or (grouped-query attention) one KV group: the query heads that
share a key/value head plus that key/value head (``mat_ds/adapters/hf_llama.py`` says why).

Layouts (``split``):

* ``"out"`` (Q/K/V projections): unit u owns output channels ``layout[u]`` (k channels); its weight parameter
  ``w{u}`` is ``W[layout[u], :]`` of shape [k, d_in] and, with ``bias``, its bias parameter ``b{u}`` is ``b[layout[u]]``.
* ``"in"`` (attention output projection): unit u owns input channels ``layout[u]``; ``w{u}`` is ``W[:, layout[u]]``,
  shape [d_out, k]. A bias here is shared by all units (one parameter ``bias``, not any unit's: it is always trained).

``layout`` defaults to contiguous blocks (unit u = channels [u·k, (u+1)·k)); HF GPT-2's blocked ``[Q | K | V]``
``c_attn`` needs the general form (unit h = channels h·k.. of each of the three blocks). ``layer`` tags the
transformer layer the units belong to: units of all head-wise linears with the same ``layer`` tag form that layer's
MAT units (unit u of a layer = part u of each of its head-wise linears).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

SPLITS = ("out", "in")


def contiguous_layout(total: int, n_units: int) -> torch.Tensor:
    """[n_units, k]: unit u owns channels [u·k, (u+1)·k)."""
    if total % n_units:
        raise ValueError(f"{total} channels are not divisible into {n_units} units")
    return torch.arange(total).view(n_units, total // n_units)


def _assemble(weights: Sequence[torch.Tensor], split_dim: int, order: Optional[torch.Tensor]) -> torch.Tensor:
    """The full weight [d_out, d_in] in the ORIGINAL channel order from the per-unit parameters."""
    w = torch.cat(list(weights), dim=split_dim)  # unit-major
    if order is None:
        return w
    return w.index_select(split_dim, order.to(w.device))  # order[c] = unit-major position of original channel c


class HeadwiseLinearFn(torch.autograd.Function):
    """y = x Wᵀ (+ b) with W assembled from per-unit parameters; weight/bias gradients only for units that require
    grad. ``weight_grads=False`` (the mNTK probe) computes no weight gradient at all: ``ctx.needs_input_grad`` is fixed
    at forward time, so a later ``autograd.grad`` w.r.t. activations only would otherwise still pay for every dW GEMM.

    Inputs: x, split_dim, weight_grads, order (or None), layout (or None), n_units, shared_bias (or None), then the
    n_units weights, then (split "out" with bias) the n_units biases.
    """

    @staticmethod
    def forward(ctx, x, split_dim, weight_grads, order, layout, n_units, shared_bias,  # type: ignore[override]
                *params):
        weights, biases = params[:n_units], params[n_units:]
        w = _assemble(weights, split_dim, order)
        if biases:
            b = _assemble(biases, 0, order)
        else:
            b = shared_bias
        # Save the parameters themselves, not the assembled weight: under ZeRO-3 they are re-gathered for backward
        # instead of keeping a full copy alive between forward and backward.
        ctx.save_for_backward(x, *params)
        ctx.split_dim, ctx.weight_grads, ctx.order, ctx.layout, ctx.n_units = split_dim, weight_grads, order, layout, \
            n_units
        ctx.has_shared_bias = shared_bias is not None
        return F.linear(x, w, b)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, *params = ctx.saved_tensors
        n_units, split_dim = ctx.n_units, ctx.split_dim
        weights, biases = params[:n_units], params[n_units:]
        first = 7  # index of the first parameter among forward's inputs
        need = ctx.needs_input_grad[first:] if ctx.weight_grads else [False] * len(params)
        need_w, need_b = need[:n_units], need[n_units:]
        dx = None
        if ctx.needs_input_grad[0]:
            dx = dy @ _assemble(weights, split_dim, ctx.order)
        d_shared = None
        if ctx.has_shared_bias and ctx.needs_input_grad[6]:
            d_shared = dy.reshape(-1, dy.shape[-1]).sum(0)
        grads: list[Optional[torch.Tensor]] = [None] * len(params)
        active = [u for u, want in enumerate(need_w) if want]
        x2 = x.reshape(-1, x.shape[-1])
        dy2 = dy.reshape(-1, dy.shape[-1])
        if active:
            layout = ctx.layout
            if layout is None and len(active) == n_units:
                # Everything trains, contiguous layout: one GEMM, then split (cheapest).
                dw = dy2.t() @ x2
                k = weights[0].shape[split_dim]
                for u, part in enumerate(dw.split(k, dim=split_dim)):
                    grads[u] = part.contiguous()
            else:
                # Gather the active units' channels so the weight gradient is still ONE GEMM, sized by active units.
                lay = layout if layout is not None else contiguous_layout(
                    n_units * weights[0].shape[split_dim], n_units)
                idx = lay[active].flatten().to(dy.device)
                k = lay.shape[1]
                if split_dim == 0:
                    dw = dy2.index_select(1, idx).t() @ x2
                else:
                    dw = dy2.t() @ x2.index_select(1, idx)
                for u, part in zip(active, dw.split(k, dim=split_dim)):
                    grads[u] = part.contiguous()
        for u, want in enumerate(need_b):
            if want:
                lay = ctx.layout if ctx.layout is not None else contiguous_layout(dy.shape[-1], n_units)
                grads[n_units + u] = dy2.index_select(1, lay[u].to(dy.device)).sum(0)
        return (dx, None, None, None, None, None, d_shared, *grads)


class HeadwiseLinear(nn.Module):
    """A linear layer whose weight (and, for ``split="out"``, bias) is stored as one parameter per unit:
    ``w0 .. w{U-1}`` (and ``b0 .. b{U-1}``). Computes exactly what ``nn.Linear`` with the assembled weight computes.

    Parameters are registered directly on this module (not in a ParameterList) so ZeRO-3's pre-forward hook, which
    gathers ``module.parameters(recurse=False)``, fetches them when this module runs.
    """

    def __init__(self, d_in: int, d_out: int, n_units: int, split: str, bias: bool = False,
                 layout: Optional[torch.Tensor] = None, init_std: float = 0.02, layer: Optional[int] = None,
                 device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        total = d_out if split == "out" else d_in
        if layout is None:
            contiguous_layout(total, n_units)  # validates divisibility
        else:
            layout = torch.as_tensor(layout, dtype=torch.long)
            if layout.dim() != 2 or layout.shape[0] != n_units or layout.numel() != total \
                    or not torch.equal(layout.flatten().sort().values, torch.arange(total)):
                raise ValueError(f"layout must be a [n_units={n_units}, k] permutation of {total} channels")
            if torch.equal(layout.flatten(), torch.arange(total)):
                layout = None  # contiguous: the fast path
        self.d_in, self.d_out, self.n_units, self.split = d_in, d_out, n_units, split
        self.split_dim = 0 if split == "out" else 1
        self.layer = layer
        k = total // n_units
        # Buffers would be moved/cast by .to() and end up in state_dicts; these are index bookkeeping only.
        self.layout: Optional[torch.Tensor] = layout
        self.order: Optional[torch.Tensor] = None if layout is None else torch.argsort(layout.flatten())
        shape = (k, d_in) if split == "out" else (d_out, k)
        for u in range(n_units):
            w = nn.Parameter(torch.empty(shape, **factory))
            nn.init.normal_(w, std=init_std)
            self.register_parameter(f"w{u}", w)
        self.has_unit_bias = bias and split == "out"
        if self.has_unit_bias:
            for u in range(n_units):
                self.register_parameter(f"b{u}", nn.Parameter(torch.zeros(k, **factory)))
        self.bias = nn.Parameter(torch.zeros(d_out, **factory)) if bias and split == "in" else None
        self.recorder: Optional[list] = None  # set by mat_ds.core.mntk.record_activations

    # -- construction from existing layers ----------------------------------------------------------------------------
    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: Optional[torch.Tensor], n_units: int, split: str,
                    layout: Optional[torch.Tensor] = None, layer: Optional[int] = None) -> "HeadwiseLinear":
        """A head-wise layer computing exactly ``F.linear(x, weight, bias)`` (weight [d_out, d_in]), same dtype and
        device; the parameters are copies."""
        d_out, d_in = weight.shape
        # Parameters start on the meta device (no random init of a large layer that is overwritten right away).
        mod = cls(d_in, d_out, n_units, split, bias=bias is not None, layout=layout, layer=layer, device="meta",
                  dtype=weight.dtype)
        mod.to_empty(device=weight.device)
        lay = mod.unit_layout()
        with torch.no_grad():
            for u in range(n_units):
                part = weight[lay[u]] if split == "out" else weight[:, lay[u]]
                getattr(mod, f"w{u}").copy_(part)
                if mod.has_unit_bias:
                    getattr(mod, f"b{u}").copy_(bias[lay[u]])
            if mod.bias is not None:
                mod.bias.copy_(bias)
        return mod

    @classmethod
    def from_linear(cls, linear: nn.Linear, n_units: int, split: str, layout: Optional[torch.Tensor] = None,
                    layer: Optional[int] = None) -> "HeadwiseLinear":
        """Convert an ``nn.Linear`` (function unchanged)."""
        return cls.from_weight(linear.weight.detach(), None if linear.bias is None else linear.bias.detach(),
                               n_units, split, layout, layer)

    @classmethod
    def from_conv1d(cls, conv: nn.Module, n_units: int, split: str, layout: Optional[torch.Tensor] = None,
                    layer: Optional[int] = None) -> "HeadwiseLinear":
        """Convert a GPT-2 style ``Conv1D`` (y = x W + b with W [d_in, d_out], i.e. a transposed linear weight)."""
        return cls.from_weight(conv.weight.detach().t(), None if conv.bias is None else conv.bias.detach(),
                               n_units, split, layout, layer)

    # -- what the probe and the freezer read ----------------------------------------------------------------------
    def unit_layout(self) -> torch.Tensor:
        """[n_units, k] original channel indices (along the split dimension) owned by each unit."""
        total = self.d_out if self.split == "out" else self.d_in
        return self.layout if self.layout is not None else contiguous_layout(total, self.n_units)

    def weight_params(self) -> list[nn.Parameter]:
        return [getattr(self, f"w{u}") for u in range(self.n_units)]

    def bias_params(self) -> list[nn.Parameter]:
        """Per-unit biases (split "out" with bias), else []."""
        return [getattr(self, f"b{u}") for u in range(self.n_units)] if self.has_unit_bias else []

    def unit_params(self, u: int) -> list[nn.Parameter]:
        """Everything unit ``u`` owns in this layer."""
        out = [getattr(self, f"w{u}")]
        if self.has_unit_bias:
            out.append(getattr(self, f"b{u}"))
        return out

    def full_weight(self) -> torch.Tensor:
        """The assembled [d_out, d_in] weight (a copy), e.g. to export back to ``nn.Linear``."""
        return _assemble(self.weight_params(), self.split_dim, self.order)

    def full_bias(self) -> Optional[torch.Tensor]:
        if self.has_unit_bias:
            return _assemble(self.bias_params(), 0, self.order)
        return self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probing = self.recorder is not None
        y = HeadwiseLinearFn.apply(x, self.split_dim, not probing, self.order, self.layout, self.n_units, self.bias,
                                   *self.weight_params(), *self.bias_params())
        if probing:
            self.recorder.append((self, x.detach(), y))
        return y

    def extra_repr(self) -> str:
        return (f"d_in={self.d_in}, d_out={self.d_out}, n_units={self.n_units}, split={self.split}, "
                f"bias={self.has_unit_bias or self.bias is not None}, layer={self.layer}"
                + (", layout=custom" if self.layout is not None else ""))


def headwise_layers(model: nn.Module) -> list[HeadwiseLinear]:
    """Every head-wise linear of ``model`` in module order."""
    return [m for m in model.modules() if isinstance(m, HeadwiseLinear)]


def per_sample_unit_grads(module: HeadwiseLinear, x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Per-sample, per-unit WEIGHT gradients from activations: [n, U, P_unit] (P_unit = one unit's weight numel, in
    the row-major order of ``w{u}``). For y = x Wᵀ summed over positions t, dL_i/dW = Σ_t dy_{i,t} ⊗ x_{i,t} = dY_iᵀ X_i.
    ``x``: [n, T, d_in], ``dy``: [n, T, d_out]. (Reference form; the probe uses ``mntk.shard_unit_gram``.)"""
    n, U = x.shape[0], module.n_units
    lay = module.unit_layout().to(x.device)
    if module.split == "out":
        dyu = dy.index_select(-1, lay.flatten())  # unit-major output channels
        return torch.einsum("nto,nti->noi", dyu, x).reshape(n, U, -1)
    xu = x.index_select(-1, lay.flatten())
    g = torch.einsum("nto,nti->noi", dy, xu)  # [n, d_out, U·k]
    k = lay.shape[1]
    return g.reshape(n, module.d_out, U, k).permute(0, 2, 1, 3).reshape(n, U, -1)


def init_std_for_residual(n_layer: int, std: float = 0.02) -> float:
    """GPT-2's scaled init for projections that write into the residual stream."""
    return std / math.sqrt(2 * n_layer)
