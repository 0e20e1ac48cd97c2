"""mNTK λmax (``mat_ds.core.mntk.probe_units``) against ground truth: an explicit per-sample Jacobian on a tiny model
(``tests/oracles.py``), with the own model's per-sample probe function (``mat_ds.adapters.own.probe_fn``)."""
import pytest
import torch

from mat_ds.adapters.own import probe_fn as own_probe_fn
from mat_ds.config import ModelConfig
from mat_ds.core.config import MATConfig
from mat_ds.core.mntk import lambda_max, probe_units
from mat_ds.core.units import find_units
from mat_ds.models.transformer import Transformer
from tests.oracles import explicit_head_grams


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


def head_grams(model, batch, probe_output: str = "loss", seed: int = 0) -> torch.Tensor:
    """[units, n, n] Grams of every attention unit from ONE probe pass (what the engine's refresh computes)."""
    fn = own_probe_fn(MATConfig(probe_output=probe_output, seed=seed))
    return probe_units(model, find_units(model), batch, fn).head_grams


def explicit(model, batch, probe_output: str = "loss", seed: int = 0) -> torch.Tensor:
    fn = own_probe_fn(MATConfig(probe_output=probe_output, seed=seed))
    return explicit_head_grams(model, find_units(model), batch, fn)


@pytest.mark.parametrize("arch", ["bert", "gpt"])
@pytest.mark.parametrize("probe_output", ["loss", "logit_projection", "logit_sum"])
def test_gram_matches_explicit_jacobian(arch, probe_output):
    m, b = tiny(arch), probe_batch(arch)
    fast = head_grams(m, b, probe_output, seed=3)
    ref = explicit(m, b, probe_output, seed=3)
    assert fast.shape == (2 * 3, 5, 5)  # flat unit order: layer-major, head within layer
    rel = (fast - ref).norm() / ref.norm()
    assert rel < 1e-5, rel  # float32 Gram accumulation vs a float64 explicit Jacobian
    lam, lam_ref = lambda_max(fast), lambda_max(ref)
    assert torch.all((lam - lam_ref).abs() / lam_ref.abs() < 1e-4)
    # Heads really differ, and the eigenvalue is the top of the spectrum of a PSD matrix.
    assert lam.std() > 0 and torch.all(lam > 0)


def test_float32_model_within_1e4_of_float64_ground_truth():
    m, b = tiny("bert"), probe_batch("bert", n=6)
    ref = lambda_max(explicit(m, b))
    m = m.float()
    fn = own_probe_fn(MATConfig())
    lam32 = probe_units(m, find_units(m), {k: v for k, v in b.items()}, fn).head_lambda_max()
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
    assert torch.allclose(full[:, 1:3, 1:3], sub, rtol=1e-5, atol=1e-9)


def test_probe_fn_must_return_one_scalar_per_sample():
    m, b = tiny("bert"), probe_batch("bert")
    with pytest.raises(ValueError, match="one scalar per probe sample"):
        probe_units(m, find_units(m), b, lambda model, batch: model(batch["input_ids"], batch["labels"]))
