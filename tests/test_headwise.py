"""HeadwiseLinearFn: same values and gradients as a dense linear; frozen heads get no weight gradient."""
import pytest
import torch

from mat_ds.headwise import HeadwiseLinear


@pytest.mark.parametrize("split", ["out", "in"])
def test_matches_dense_linear_and_skips_frozen(split):
    torch.manual_seed(0)
    lin = HeadwiseLinear(12, 12 * (3 if split == "out" else 1), n_heads=4, split=split).double()
    x = torch.randn(2, 5, 12, dtype=torch.double, requires_grad=True)
    w = torch.cat([p.detach() for p in lin.head_params()], dim=lin.split_dim).requires_grad_(True)
    ref = x @ w.t()
    dy = torch.randn_like(ref)
    ref.backward(dy)
    x_ref_grad = x.grad.clone()
    x.grad = None

    frozen = {1, 2}
    for h, p in enumerate(lin.head_params()):
        p.requires_grad_(h not in frozen)
    y = lin(x)
    assert torch.allclose(y, ref)
    y.backward(dy)
    assert torch.allclose(x.grad, x_ref_grad)  # input gradient flows through ALL heads
    for h, (p, gref) in enumerate(zip(lin.head_params(), w.grad.split(p.shape[lin.split_dim], lin.split_dim))):
        if h in frozen:
            assert p.grad is None
        else:
            assert torch.allclose(p.grad, gref)


def test_weight_grad_flops_scale_with_active_heads():
    """With 1 of 4 heads active, the weight-gradient GEMM is sized for 1 head (checked via the profiler's FLOPs)."""
    torch.manual_seed(0)
    lin = HeadwiseLinear(64, 192, n_heads=4, split="out")
    x = torch.randn(8, 32, 64, requires_grad=True)

    def backward_flops(active):
        for h, p in enumerate(lin.head_params()):
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
