"""mNTK λmax against ground truth: an explicit per-sample Jacobian on a tiny model."""
import pytest
import torch

from mat_ds.config import ModelConfig
from mat_ds.mntk import explicit_head_grams, head_grams, head_lambda_max, lambda_max
from mat_ds.model import Transformer


def tiny(arch: str) -> Transformer:
    torch.manual_seed(0)
    m = Transformer(ModelConfig(arch=arch, n_layer=2, n_head=3, d_model=12, d_ff=24, dropout=0.1), 37, 10).double()
    # Move away from init so heads differ (a trained-looking model, not a symmetric one).
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def probe_batch(arch: str, n: int = 5):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 37, (n, 10), generator=g)
    if arch == "gpt":
        return {"input_ids": ids, "labels": ids.clone()}
    labels = torch.full_like(ids, -100)
    sel = torch.rand(ids.shape, generator=g) < 0.3
    sel[:, 0] = True
    labels[sel] = ids[sel]
    return {"input_ids": ids, "labels": labels}


@pytest.mark.parametrize("arch", ["bert", "gpt"])
@pytest.mark.parametrize("probe_output", ["loss", "logit_projection"])
def test_gram_matches_explicit_jacobian(arch, probe_output):
    m, b = tiny(arch), probe_batch(arch)
    fast = head_grams(m, b, probe_output, seed=3)
    ref = explicit_head_grams(m, b, probe_output, seed=3)
    assert fast.shape == (2, 3, 5, 5)
    rel = (fast - ref).norm() / ref.norm()
    assert rel < 1e-5, rel  # float32 Gram accumulation vs a float64 explicit Jacobian
    lam, lam_ref = lambda_max(fast), lambda_max(ref)
    assert torch.all((lam - lam_ref).abs() / lam_ref.abs() < 1e-4)
    # Heads really differ, and the eigenvalue is the top of the spectrum of a PSD matrix.
    assert lam.std() > 0 and torch.all(lam > 0)


def test_float32_model_within_1e4_of_float64_ground_truth():
    m, b = tiny("bert"), probe_batch("bert", n=6)
    ref = lambda_max(explicit_head_grams(m, b))
    lam32 = head_lambda_max(m.float(), {k: v for k, v in b.items()})
    assert torch.all((lam32 - ref).abs() / ref < 1e-4), (lam32, ref)


def test_probe_leaves_no_parameter_grads_and_restores_mode():
    m, b = tiny("bert"), probe_batch("bert")
    m.train()
    head_grams(m, b)
    assert all(p.grad is None for p in m.parameters())
    assert m.training


def test_probe_is_independent_of_batch_companions():
    """Θ_ii of a sample must not depend on which other samples share the probe batch (per-sample correctness)."""
    m, b = tiny("gpt"), probe_batch("gpt", n=4)
    full = head_grams(m, b)
    sub = head_grams(m, {k: v[1:3] for k, v in b.items()})
    assert torch.allclose(full[:, :, 1:3, 1:3], sub, rtol=1e-5, atol=1e-9)
