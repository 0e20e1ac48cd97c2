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
transformer layer the units belong to, and ``kind`` what they are: ``"heads"`` (attention heads or KV groups) or
``"mlp"`` (groups of an MLP block's hidden channels: the up/gate projections split "out", the down projection split
"in", whose bias is shared). Units of all head-wise linears with the same (``layer``, ``kind``) tags form that layer's
MAT units of that kind (unit u = part u of each of them).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

SPLITS = ("out", "in")
KINDS = ("heads", "mlp")  # what a head-wise linear's units are (mat_ds/core/units.py)


def contiguous_layout(total: int, n_units: int) -> torch.Tensor:
    """[n_units, k]: unit u owns channels [u·k, (u+1)·k)."""
    if total % n_units:
        raise ValueError(f"{total} channels are not divisible into {n_units} units")
    return torch.arange(total).view(n_units, total // n_units)


def blocked_layout(widths: Sequence[int], n_units: int) -> torch.Tensor:
    """[n_units, Σw/n_units] for a fused projection whose output is the concatenation of blocks of ``widths`` (e.g.
    ``[Q | K | V]``): unit u owns part u of every block, i.e. channels start_b + [u·w_b/U, (u+1)·w_b/U) of each block
    b. GPT-2's ``c_attn`` is ``[d, d, d]`` with U = H; Phi-3's ``qkv_proj`` ``[H·k, H_kv·k, H_kv·k]`` with U = H_kv.
    (A layout interleaved per unit, like GPT-NeoX's or Megatron-Core's ``linear_qkv`` ``[groups, (r + 2)·k]``, is the
    contiguous default.)"""
    if any(w % n_units for w in widths):
        raise ValueError(f"block widths {list(widths)} are not all divisible into {n_units} units")
    parts, start = [], 0
    for w in widths:
        parts.append(start + contiguous_layout(w, n_units))
        start += w
    return torch.cat(parts, dim=1)


class _UnitLayout:
    """Where each unit's channels sit among the layer's channels, worked out ONCE per layer so that a training step does
    no per-channel Python work: the layout as runs of consecutive channels that belong to one unit.

    A contiguous layout is U runs; GPT-2's blocked ``[Q | K | V]`` is 3·U runs. Few runs: the full weight is ONE
    ``torch.cat`` of slices of the unit parameters (no unit-major copy followed by an ``index_select``), and a unit's
    part of a full-layer gradient is a slice (a view for contiguous layouts). Many runs (a scattered permutation):
    ``index_select`` with ``order`` / the unit's channel indices.
    """

    def __init__(self, total: int, n_units: int, layout: Optional[torch.Tensor]):
        self.total, self.n_units, self.k = total, n_units, total // n_units
        self.layout = layout  # None: contiguous
        self.order = None if layout is None else torch.argsort(layout.flatten())
        lay = contiguous_layout(total, n_units) if layout is None else layout
        pos = torch.argsort(lay.flatten()).tolist()  # original channel c -> unit-major position
        runs: list[tuple[int, int, int, int]] = []  # (unit, start in unit, length, start in the layer)
        c = 0
        while c < total:
            u, s = divmod(pos[c], self.k)
            n = 1
            while c + n < total and pos[c + n] == pos[c] + n and s + n < self.k:
                n += 1
            runs.append((u, s, n, c))
            c += n
        self.runs = tuple(runs)
        per_unit: list[list[tuple[int, int, int]]] = [[] for _ in range(n_units)]
        for u, s, n, c in runs:
            per_unit[u].append((s, n, c))
        self.unit_runs = tuple(tuple(sorted(r)) for r in per_unit)  # per unit: (start in unit, length, start in layer)
        self.sliced = len(runs) <= 4 * n_units
        self._lay: dict[torch.device, torch.Tensor] = {}
        self._order: dict[torch.device, torch.Tensor] = {}

    def lay(self, device: torch.device) -> torch.Tensor:
        """[n_units, k] channel indices on ``device`` (cached)."""
        if device not in self._lay:
            lay = contiguous_layout(self.total, self.n_units) if self.layout is None else self.layout
            self._lay[device] = lay.to(device)
        return self._lay[device]

    def assemble(self, parts: Sequence[torch.Tensor], dim: int) -> torch.Tensor:
        """The full tensor in the ORIGINAL channel order from the per-unit ones (a new tensor, one copy)."""
        if self.layout is None:
            return torch.cat(list(parts), dim=dim)
        if self.sliced:
            return torch.cat([parts[u].narrow(dim, s, n) for u, s, n, _ in self.runs], dim=dim)
        device = parts[0].device
        if device not in self._order:
            self._order[device] = self.order.to(device)
        return torch.cat(list(parts), dim=dim).index_select(dim, self._order[device])  # order[c]: unit-major position

    def unit_part(self, full: torch.Tensor, dim: int, u: int) -> torch.Tensor:
        """Unit ``u``'s part of a full-layer tensor (channels along ``dim``), in the unit's own channel order."""
        if self.layout is None:
            return full.narrow(dim, u * self.k, self.k)
        if self.sliced:
            pieces = [full.narrow(dim, c, n) for _, n, c in self.unit_runs[u]]
            return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)
        return full.index_select(dim, self.lay(full.device)[u])


def _partitioned(p: torch.Tensor) -> bool:
    """A ZeRO-3 parameter (its full data exists only while DeepSpeed has gathered it)."""
    return hasattr(p, "ds_tensor")


class HeadwiseLinearFn(torch.autograd.Function):
    """y = x Wᵀ (+ b) with W assembled from per-unit parameters; weight/bias gradients only for units that require
    grad. ``weight_grads=False`` (the mNTK probe) computes no weight gradient at all: ``ctx.needs_input_grad`` is fixed
    at forward time, so a later ``autograd.grad`` w.r.t. activations only would otherwise still pay for every dW GEMM.

    Inputs: x, plan (the layer's ``_UnitLayout``), split_dim, weight_grads, shared_bias (or None), then the n_units
    weights, then (split "out" with bias) the n_units biases.

    Cost against ``nn.Linear`` (same three GEMMs): one copy of the weight to assemble it in forward (kept for backward
    unless the parameters are ZeRO-3 partitions, which are re-gathered and re-assembled instead of holding a full copy
    between forward and backward); with every unit training, the weight gradient is ONE GEMM in the layer's channel
    order whose unit parts are views (split "out", contiguous layout) or one weight-sized copy (split "in", or GPT-2's
    blocked layout); bias gradients are one column sum, split by unit.
    """

    @staticmethod
    def forward(ctx, x, plan, split_dim, weight_grads, shared_bias, *params):  # type: ignore[override]
        n_units = plan.n_units
        weights, biases = params[:n_units], params[n_units:]
        w = plan.assemble(weights, split_dim)
        b = plan.assemble(biases, 0) if biases else shared_bias
        ctx.kept_weight = not _partitioned(weights[0])
        # ZeRO-3: save the parameters themselves, not the assembled weight, so they are re-gathered for backward
        # instead of keeping a full copy alive between forward and backward. Otherwise reuse the assembled weight.
        if ctx.kept_weight:
            ctx.save_for_backward(x, w)
        else:
            ctx.save_for_backward(x, *weights)
        ctx.plan, ctx.split_dim, ctx.weight_grads, ctx.n_params = plan, split_dim, weight_grads, len(params)
        ctx.has_shared_bias = shared_bias is not None
        return F.linear(x, w, b)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, *saved = ctx.saved_tensors
        plan, split_dim = ctx.plan, ctx.split_dim
        n_units = plan.n_units
        first = 5  # index of the first parameter among forward's inputs
        need = ctx.needs_input_grad[first:] if ctx.weight_grads else (False,) * ctx.n_params
        need_w, need_b = need[:n_units], need[n_units:]
        # One 2-D view (a copy only if dy is not contiguous, e.g. behind attention's head transpose) serves every GEMM
        # below; ``dy @ w`` on a non-contiguous 3-D dy would copy it again or take a batched-matmul path.
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = None
        if ctx.needs_input_grad[0]:
            w = saved[0] if ctx.kept_weight else plan.assemble(saved, split_dim)
            dx = dy2.mm(w).view(x.shape)
        d_shared = None
        if ctx.has_shared_bias and ctx.needs_input_grad[4]:
            d_shared = dy2.sum(0)
        grads: list[Optional[torch.Tensor]] = [None] * ctx.n_params
        active = [u for u, want in enumerate(need_w) if want]
        if active:
            x2 = x.reshape(-1, x.shape[-1])
            if len(active) == n_units:
                # Everything trains: one GEMM in the layer's channel order, then each unit's part (cheapest).
                dw = dy2.t() @ x2
                for u in range(n_units):
                    grads[u] = plan.unit_part(dw, split_dim, u).contiguous()
            elif plan.layout is None:
                # Contiguous layout: one GEMM per run of consecutive active units, on a narrowed VIEW of dy (split
                # "out") or x (split "in"): no gathered copy. Measured at the converge model's sizes (N 2048 tokens,
                # d 128-512, 1 thread): 1.2-1.7x faster than gathering the active channels for one GEMM.
                k, i = plan.k, 0
                while i < len(active):
                    j = i
                    while j + 1 < len(active) and active[j + 1] == active[j] + 1:
                        j += 1
                    lo, width = active[i] * k, (j - i + 1) * k
                    dw = dy2.narrow(1, lo, width).t() @ x2 if split_dim == 0 else dy2.t() @ x2.narrow(1, lo, width)
                    for u, part in zip(active[i:j + 1], dw.split(k, dim=split_dim)):
                        grads[u] = part.contiguous()
                    i = j + 1
            else:
                # Gather the active units' channels so the weight gradient is still ONE GEMM, sized by active units.
                idx = plan.lay(dy.device)[active].flatten()
                if split_dim == 0:
                    dw = dy2.index_select(1, idx).t() @ x2
                else:
                    dw = dy2.t() @ x2.index_select(1, idx)
                for u, part in zip(active, dw.split(plan.k, dim=split_dim)):
                    grads[u] = part.contiguous()
        if any(need_b):
            db = dy2.sum(0)  # every unit's bias gradient from one column sum
            for u, want in enumerate(need_b):
                if want:
                    grads[n_units + u] = plan.unit_part(db, 0, u).contiguous()
        return (dx, None, None, None, d_shared, *grads)


class HeadwiseLinear(nn.Module):
    """A linear layer whose weight (and, for ``split="out"``, bias) is stored as one parameter per unit:
    ``w0 .. w{U-1}`` (and ``b0 .. b{U-1}``). Computes exactly what ``nn.Linear`` with the assembled weight computes.

    Parameters are registered directly on this module (not in a ParameterList) so ZeRO-3's pre-forward hook, which
    gathers ``module.parameters(recurse=False)``, fetches them when this module runs.
    """

    def __init__(self, d_in: int, d_out: int, n_units: int, split: str, bias: bool = False,
                 layout: Optional[torch.Tensor] = None, init_std: float = 0.02, layer: Optional[int] = None,
                 device=None, dtype=None, kind: str = "heads"):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
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
        self.layer, self.kind = layer, kind
        # Under tensor parallelism a rank holds units [unit_offset, unit_offset + n_units) of the layer's
        # units_total (mat_ds/core/tensor_parallel.py); without it, all of them.
        self.unit_offset, self.units_total = 0, n_units
        k = total // n_units
        # Buffers would be moved/cast by .to() and end up in state_dicts; these are index bookkeeping only.
        self.layout: Optional[torch.Tensor] = layout
        self._plan = _UnitLayout(total, n_units, layout)
        self.order: Optional[torch.Tensor] = self._plan.order
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
        self.recorder: Optional[list] = None  # set by mat_ds.core.headwise_gram.record_activations

    # -- construction from existing layers ----------------------------------------------------------------------------
    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: Optional[torch.Tensor], n_units: int, split: str,
                    layout: Optional[torch.Tensor] = None, layer: Optional[int] = None,
                    kind: str = "heads") -> "HeadwiseLinear":
        """A head-wise layer computing exactly ``F.linear(x, weight, bias)`` (weight [d_out, d_in]), same dtype and
        device; the parameters are copies."""
        d_out, d_in = weight.shape
        # Parameters start on the meta device (no random init of a large layer that is overwritten right away).
        mod = cls(d_in, d_out, n_units, split, bias=bias is not None, layout=layout, layer=layer, device="meta",
                  dtype=weight.dtype, kind=kind)
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
                    layer: Optional[int] = None, kind: str = "heads") -> "HeadwiseLinear":
        """Convert an ``nn.Linear`` (function unchanged)."""
        return cls.from_weight(linear.weight.detach(), None if linear.bias is None else linear.bias.detach(),
                               n_units, split, layout, layer, kind)

    @classmethod
    def from_conv1d(cls, conv: nn.Module, n_units: int, split: str, layout: Optional[torch.Tensor] = None,
                    layer: Optional[int] = None, kind: str = "heads") -> "HeadwiseLinear":
        """Convert a GPT-2 style ``Conv1D`` (y = x W + b with W [d_in, d_out], i.e. a transposed linear weight)."""
        return cls.from_weight(conv.weight.detach().t(), None if conv.bias is None else conv.bias.detach(),
                               n_units, split, layout, layer, kind)

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
        return self._plan.assemble(self.weight_params(), self.split_dim)

    def full_bias(self) -> Optional[torch.Tensor]:
        if self.has_unit_bias:
            return self._plan.assemble(self.bias_params(), 0)
        return self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probing = self.recorder is not None
        y = HeadwiseLinearFn.apply(x, self._plan, self.split_dim, not probing, self.bias, *self.weight_params(),
                                   *self.bias_params())
        if probing:
            self.recorder.append((self, x.detach(), y))
        return y

    def extra_repr(self) -> str:
        return (f"d_in={self.d_in}, d_out={self.d_out}, n_units={self.n_units}, split={self.split}, "
                f"bias={self.has_unit_bias or self.bias is not None}, layer={self.layer}"
                + (f", kind={self.kind}" if self.kind != "heads" else "")
                + (", layout=custom" if self.layout is not None else ""))


def swap_in(parent: nn.Module, attr: str, build) -> bool:
    """Replace ``parent.<attr>`` by ``build(old)`` (a HeadwiseLinear of the same function) unless it already is one:
    conversion is idempotent. A deliberately frozen projection stays frozen, and the train/eval mode is kept.
    Returns whether anything was replaced (the one home of this step for every adapter)."""
    old = getattr(parent, attr)
    if isinstance(old, HeadwiseLinear):
        return False
    new = build(old)  # same dtype/device as `old`
    for p in new.parameters():
        p.requires_grad_(old.weight.requires_grad)
    new.train(old.training)
    setattr(parent, attr, new)
    return True


def linear_dims(m: Optional[nn.Module]) -> Optional[tuple[int, int]]:
    """(d_in, d_out) of a linear projection, converted (head-wise) or not; None when ``m`` is not one. Lets an
    adapter's structural match see the same layout before and after conversion."""
    if isinstance(m, HeadwiseLinear):
        return m.d_in, m.d_out
    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features
    return None


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
