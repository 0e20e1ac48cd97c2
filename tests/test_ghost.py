"""The ghost Gram (activation Grams, no per-sample gradients) equals the materialised one and the explicit Jacobian;
the cost model picks per layer within the memory bound; a probe that cannot fit is a one-line error."""
import pytest
import torch
import transformers as tf

from mat_ds.adapters import convert_model
from mat_ds.core import ghost
from mat_ds.core.config import ConfigError, MATConfig
from mat_ds.core.headwise import HeadwiseLinear
from mat_ds.core.mntk import lambda_max, probe_units, shard_unit_gram, unit_param_shape
from mat_ds.core.units import find_units
from tests.oracles import explicit_head_grams


@pytest.mark.parametrize("split", ["out", "in"])
def test_ghost_equals_materialized_for_any_layout(split):
    torch.manual_seed(0)
    d, H, k = 12, 3, 4
    layout = torch.stack([torch.cat([g * d + h * k + torch.arange(k) for g in range(3)]) for h in range(H)]) \
        if split == "out" else torch.randperm(d).view(H, -1)
    m = HeadwiseLinear(d, 3 * d if split == "out" else d, H, split, layout=layout, layer=0)
    x, dy = torch.randn(5, 7, d, dtype=torch.double), torch.randn(5, 7, m.d_out, dtype=torch.double)
    rows, cols = unit_param_shape(m)
    assert torch.allclose(ghost.ghost_unit_gram(x, dy, m), shard_unit_gram(x, dy, m, 0, rows * cols), rtol=1e-12)


def _llama():
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                              num_key_value_heads=2, intermediate_size=64))


def _bert():
    torch.manual_seed(0)
    return tf.BertForMaskedLM(tf.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                            intermediate_size=64))


@pytest.mark.parametrize("make", [_bert, _llama])
def test_probe_units_ghost_matches_explicit_jacobian(make):
    model = make()
    conversion = convert_model(model)
    units = find_units(model)
    probe_fn = conversion.probe_fn(model, MATConfig())
    ids = torch.randint(0, 97, (6, 10))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    ref = lambda_max(explicit_head_grams(model, units, batch, probe_fn))
    for form in ("ghost", "materialized", "auto"):
        lam = probe_units(model, units, batch, probe_fn, gram=form).head_lambda_max()
        assert ((lam - ref).abs() / ref).max() < 1e-4, form


def test_cost_model_picks_cheaper_form_within_memory():
    # A 7B model's QKV (d 4096, 32 heads), n 16, T 512: one unit's per-sample gradients are 100 MB (charged twice),
    # so the materialised form fits 2 GiB and has fewer FLOPs than the ghost form's (nT)² kernels.
    qkv = HeadwiseLinear(4096, 3 * 4096, 32, "out", layer=0, device="meta")
    cost = ghost.layer_cost(16, 512, 4096, 3 * 4096, 32)
    assert cost.materialized_bytes == 4 * (2 * 16 * 4096 * 3 * 4096 // 32 + 16 * 512 * 4 * 4096)
    assert cost.materialized_flops < cost.ghost_flops
    assert ghost.choose(qkv, 16, 512, "auto", 2 << 30) == "materialized"
    # Two units (half the layer's per-sample gradients each, 3.2 GB charged): only the ghost form fits 2 GiB.
    wide = HeadwiseLinear(4096, 3 * 4096, 2, "out", layer=0, device="meta")
    assert ghost.choose(wide, 16, 512, "auto", 8 << 30) == "materialized"  # fits: fewer FLOPs
    assert ghost.choose(wide, 16, 512, "auto", 2 << 30) == "ghost"
    small = HeadwiseLinear(128, 384, 4, "out", layer=0)
    assert ghost.choose(small, 16, 128, "auto", 2 << 30) == "materialized"
    with pytest.raises(ValueError, match="lower mat.probe_samples") as err:
        ghost.choose(qkv, 64, 4096, "auto", 1 << 30)
    assert "\n" not in str(err.value)


def test_probe_that_cannot_fit_is_a_config_error_at_start():
    with pytest.raises(ConfigError, match="mat.probe_gram"):
        MATConfig(probe_gram="exact")
    with pytest.raises(ConfigError, match="mat.probe_memory_mb"):
        MATConfig(probe_memory_mb=0)
