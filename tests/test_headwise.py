"""HeadwiseLinear (``mat_ds/core/headwise.py``): same values and gradients as a dense linear; frozen units get no
weight gradient; conversion from ``nn.Linear`` / GPT-2 ``Conv1D`` keeps the function and the gradients for any layout;
the per-unit Gram pieces the probe uses (``shard_unit_gram``, ``unit_bias_gram``) add up to the per-sample gradients'
Gram for a non-contiguous (GPT-2-like blocked) layout with per-unit biases.
"""
import math

import pytest
import torch
from torch import nn

from mat_ds.core.headwise import HeadwiseLinear, per_sample_unit_grads
from mat_ds.core.mntk import shard_unit_gram, unit_bias_gram, unit_param_shape


@pytest.mark.parametrize("split", ["out", "in"])
@pytest.mark.parametrize("frozen", [{1, 2}, {0}, {3}, {0, 2}, {0, 1, 2}])  # active runs: 2, 1 (3 units), 1, 2, 1
def test_matches_dense_linear_and_skips_frozen(split, frozen):
    torch.manual_seed(0)
    lin = HeadwiseLinear(12, 12 * (3 if split == "out" else 1), n_units=4, split=split, layer=0).double()
    x = torch.randn(2, 5, 12, dtype=torch.double, requires_grad=True)
    w = torch.cat([p.detach() for p in lin.weight_params()], dim=lin.split_dim).requires_grad_(True)
    ref = x @ w.t()
    dy = torch.randn_like(ref)
    ref.backward(dy)
    x_ref_grad = x.grad.clone()
    x.grad = None

    for h, p in enumerate(lin.weight_params()):
        p.requires_grad_(h not in frozen)
    y = lin(x)
    assert torch.allclose(y, ref)
    y.backward(dy)
    assert torch.allclose(x.grad, x_ref_grad)  # input gradient flows through ALL units
    for h, (p, gref) in enumerate(zip(lin.weight_params(), w.grad.split(p.shape[lin.split_dim], lin.split_dim))):
        if h in frozen:
            assert p.grad is None
        else:
            assert torch.allclose(p.grad, gref)


def test_weight_grad_flops_scale_with_active_heads():
    """With 1 of 4 units active, the weight-gradient GEMM is sized for 1 unit (checked via the profiler's FLOPs)."""
    torch.manual_seed(0)
    lin = HeadwiseLinear(64, 192, n_units=4, split="out", layer=0)
    x = torch.randn(8, 32, 64, requires_grad=True)

    def backward_flops(active):
        for h, p in enumerate(lin.weight_params()):
            p.requires_grad_(h in active)
            p.grad = None
        y = lin(x)
        with torch.profiler.profile(with_flops=True) as prof:
            y.sum().backward()
        return sum(e.flops for e in prof.key_averages() if e.flops)

    full, one = backward_flops({0, 1, 2, 3}), backward_flops({0})
    dx = 2 * 8 * 32 * 64 * 192
    dw_full = 2 * 8 * 32 * 64 * 192
    assert full == pytest.approx(dx + dw_full, rel=0.01)
    assert one == pytest.approx(dx + dw_full / 4, rel=0.01)


# ----------------------------------------------------------------------------------------------------------------------
# Conversion from existing layers
# ----------------------------------------------------------------------------------------------------------------------
U = 3  # units per layer in the conversion tests


class LocalConv1D(nn.Module):
    """GPT-2's transposed linear (``transformers.pytorch_utils.Conv1D`` semantics: y = x W + b, W [d_in, d_out]),
    optionally without a bias (HF's always has one)."""

    def __init__(self, d_out: int, d_in: int, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_in, d_out) * 0.3)
        self.bias = nn.Parameter(torch.zeros(d_out)) if bias else None

    def forward(self, x):
        y = x @ self.weight
        return y if self.bias is None else y + self.bias


def make_source(kind: str, d_in: int, d_out: int, bias: bool) -> nn.Module:
    if kind == "linear":
        mod = nn.Linear(d_in, d_out, bias=bias)
    else:
        try:
            from transformers.pytorch_utils import Conv1D
        except ImportError:  # pragma: no cover - transformers is a dependency
            Conv1D = None
        mod = Conv1D(d_out, d_in) if (bias and Conv1D is not None) else LocalConv1D(d_out, d_in, bias)
    with torch.no_grad():
        for p in mod.parameters():  # non-zero biases, so a misplaced bias channel shows
            p.copy_(torch.randn(p.shape) * 0.3)
    return mod.double()


def make_layout(kind: str, total: int) -> torch.Tensor | None:
    if kind == "contiguous":
        return None
    g = torch.Generator().manual_seed(total)
    return torch.randperm(total, generator=g).view(U, total // U)


def dense_weight_grad(src: nn.Module, kind: str) -> torch.Tensor:
    """The source's weight gradient in linear orientation [d_out, d_in]."""
    return src.weight.grad if kind == "linear" else src.weight.grad.t()


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("split", ["out", "in"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "permuted"])
def test_from_linear_and_conv1d_keep_output_and_gradients(kind, split, bias, layout):
    torch.manual_seed(1)
    d_in, d_out = (7, 12) if split == "out" else (12, 5)
    src = make_source(kind, d_in, d_out, bias)
    lay = make_layout(layout, d_out if split == "out" else d_in)
    convert = HeadwiseLinear.from_linear if kind == "linear" else HeadwiseLinear.from_conv1d
    hw = convert(src, U, split, layout=lay, layer=2)
    assert hw.layer == 2 and hw.n_units == U
    assert all(p.dtype == torch.float64 for p in hw.parameters())
    weight = src.weight.detach() if kind == "linear" else src.weight.detach().t()
    assert torch.equal(hw.full_weight(), weight)
    if bias:
        assert torch.equal(hw.full_bias(), src.bias.detach())
        assert hw.has_unit_bias == (split == "out") and (hw.bias is not None) == (split == "in")
    else:
        assert hw.full_bias() is None and not hw.bias_params() and hw.bias is None

    x = torch.randn(2, 4, d_in, dtype=torch.float64, requires_grad=True)
    ref = src(x)
    dy = torch.randn_like(ref)
    ref.backward(dy)
    dx_ref, dw_ref = x.grad.clone(), dense_weight_grad(src, kind)
    db_ref = src.bias.grad if bias else None
    order = hw.unit_layout()
    for frozen in (set(), {1}):  # all units train (fast path when contiguous), and one unit frozen (gathered GEMM)
        for u in range(U):
            for p in hw.unit_params(u):
                p.requires_grad_(u not in frozen)
                p.grad = None
        if hw.bias is not None:
            hw.bias.grad = None
        x.grad = None
        y = hw(x)
        assert torch.allclose(y, ref, rtol=1e-12, atol=1e-12)
        y.backward(dy)
        assert torch.allclose(x.grad, dx_ref, rtol=1e-12, atol=1e-12)
        for u in range(U):
            w = getattr(hw, f"w{u}")
            if u in frozen:
                assert w.grad is None and all(p.grad is None for p in hw.unit_params(u))
                continue
            expected = dw_ref[order[u]] if split == "out" else dw_ref[:, order[u]]
            assert torch.allclose(w.grad, expected, rtol=1e-12, atol=1e-12), (u, frozen)
            if hw.has_unit_bias:
                assert torch.allclose(getattr(hw, f"b{u}").grad, db_ref[order[u]], rtol=1e-12, atol=1e-12)
        if hw.bias is not None:  # split "in": the shared bias is nobody's unit and always trains
            assert torch.allclose(hw.bias.grad, db_ref, rtol=1e-12, atol=1e-12)


def test_layout_must_be_a_permutation():
    with pytest.raises(ValueError, match="permutation"):
        HeadwiseLinear(4, 6, 3, "out", layout=torch.tensor([[0, 1], [1, 2], [3, 4]]))
    with pytest.raises(ValueError, match="divisible"):
        HeadwiseLinear(4, 7, 3, "out")
    with pytest.raises(ValueError, match="split"):
        HeadwiseLinear(4, 6, 3, "sideways")


# ----------------------------------------------------------------------------------------------------------------------
# Gram pieces on a custom layout with per-unit biases
# ----------------------------------------------------------------------------------------------------------------------
def blocked_qkv_layout(d: int, n_units: int) -> torch.Tensor:
    """GPT-2's ``c_attn``: output [Q | K | V], head h owns channels h·k.. of each block: [n_units, 3k]."""
    k = d // n_units
    base = torch.arange(n_units)[:, None] * k + torch.arange(k)[None, :]
    return torch.cat([g * d + base for g in range(3)], dim=1)


def zero3_chunks(numel: int, world: int) -> list[tuple[int, int]]:
    ps = math.ceil(numel / world)
    return [(min(r * ps, numel), min((r + 1) * ps, numel)) for r in range(world)]


def autograd_per_sample(module: HeadwiseLinear, x: torch.Tensor, dy: torch.Tensor):
    """Ground truth: per-sample weight and per-unit bias gradients of Σ_t <y_it, dy_it>, one backward per sample."""
    n = x.shape[0]
    gw, gb = [], []
    for i in range(n):
        for p in module.parameters():
            p.grad = None
        (module(x[i:i + 1]) * dy[i:i + 1]).sum().backward()
        gw.append(torch.stack([p.grad.flatten() for p in module.weight_params()]))
        if module.has_unit_bias:
            gb.append(torch.stack([p.grad for p in module.bias_params()]))
    return torch.stack(gw), (torch.stack(gb) if gb else None)  # [n, U, P], [n, U, k]


@pytest.mark.parametrize("split", ["out", "in"])
def test_shard_cover_of_custom_layout_with_bias_sums_to_full_gram(split):
    torch.manual_seed(3)
    d, Un, n, T = 6, 3, 4, 5
    if split == "out":  # GPT-2's c_attn: blocked [Q|K|V] layout, one bias slice per unit
        src = make_source("conv1d", d, 3 * d, bias=True)
        module = HeadwiseLinear.from_conv1d(src, Un, "out", layout=blocked_qkv_layout(d, Un), layer=0)
    else:  # an output projection with permuted input channels and a shared bias (no unit owns it)
        src = make_source("linear", 2 * d, d, bias=True)
        module = HeadwiseLinear.from_linear(src, Un, "in", layout=make_layout("permuted", 2 * d), layer=0)
    assert module.layout is not None  # really a custom layout, not the contiguous fast path
    x = torch.randn(n, T, module.d_in, dtype=torch.float64)
    dy = torch.randn(n, T, module.d_out, dtype=torch.float64)

    g = per_sample_unit_grads(module, x, dy)
    gw_true, gb_true = autograd_per_sample(module, x, dy)
    assert torch.allclose(g, gw_true, rtol=1e-12, atol=1e-12)  # the reference form itself is right
    full = torch.einsum("nup,mup->unm", g, g)
    if module.has_unit_bias:
        gb = dy.sum(1)[:, module.unit_layout()]  # [n, U, k]: per-sample bias gradient of each unit
        assert torch.allclose(gb, gb_true, rtol=1e-12, atol=1e-12)
        bias_gram = unit_bias_gram(dy, module)
        assert torch.allclose(bias_gram, torch.einsum("nuk,muk->unm", gb, gb), rtol=1e-12, atol=1e-12)
        full_with_bias = full + bias_gram
        whole = torch.cat([gw_true, gb_true], dim=-1)  # the unit's Jacobian rows: weights AND bias
        assert torch.allclose(full_with_bias, torch.einsum("nup,mup->unm", whole, whole), rtol=1e-12, atol=1e-12)

    rows, cols = unit_param_shape(module)
    P = rows * cols
    assert P == g.shape[-1]
    assert torch.allclose(shard_unit_gram(x, dy, module, 0, P), full, rtol=1e-12, atol=1e-12)
    covers = [zero3_chunks(P, w) for w in (2, 3, 7)]
    cuts = [0, 1, cols - 1, cols, cols, 2 * cols + 3, P - 1, P]  # single elements, an empty range, mid-row borders
    covers.append(list(zip(cuts, cuts[1:])))
    for cover in covers:
        parts = [shard_unit_gram(x, dy, module, lo, hi) for lo, hi in cover]
        assert torch.allclose(sum(parts), full, rtol=1e-12, atol=1e-12), cover
        for (lo, hi), part in zip(cover, parts):  # each piece is exactly its slice's Gram
            s = g[:, :, lo:hi]
            assert torch.allclose(part, torch.einsum("nup,mup->unm", s, s), rtol=1e-12, atol=1e-12)
        if module.has_unit_bias:
            total = sum(parts) + unit_bias_gram(dy, module)
            assert torch.allclose(total, full_with_bias, rtol=1e-12, atol=1e-12)
