"""MLP blocks as MAT units (``"mlp"`` in ``mat.modules``): conversion keeps the function in every family, λ per MLP
unit equals an explicit Jacobian (materialised and ghost Grams), a frozen MLP unit computes no weight gradient, the
FLOPs model charges exactly the skipped GEMMs, and bad input is one line.

Single process, tiny random models (never downloaded), fp32, eval mode. The 2-rank checks through the launcher
(ZeRO 2/3, optimizer state, gradient bytes) are the ``+mlp`` cases of tests/test_families.py.
"""
from __future__ import annotations

import pytest
import torch

import mat_ds
from mat_ds.config import ModelConfig
from mat_ds.core.config import ConfigError, MATConfig
from mat_ds.core.headwise import HeadwiseLinear
from mat_ds.core.mntk import lambda_max, probe_units
from mat_ds.core.probe import hf_probe_fn
from mat_ds.core.units import find_units
from mat_ds.models.flops import FlopsModel
from mat_ds.models.transformer import Transformer
from tests.oracles import explicit_unit_grams

transformers = pytest.importorskip("transformers")

V, D, L, H, F, T, N = 100, 32, 2, 4, 64, 8, 5


def _own():
    return Transformer(ModelConfig(arch="bert", n_layer=L, n_head=H, d_model=D, d_ff=F, dropout=0.0), V, T)


def _hf(name: str, **kw):
    cls, cfg = {
        "bert": (transformers.BertForMaskedLM, transformers.BertConfig),
        "gpt2": (transformers.GPT2LMHeadModel, transformers.GPT2Config),
        "llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig),
        "mistral": (transformers.MistralForCausalLM, transformers.MistralConfig),
        "qwen2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config),
        "qwen3": (transformers.Qwen3ForCausalLM, transformers.Qwen3Config),
        "gemma2": (transformers.Gemma2ForCausalLM, transformers.Gemma2Config),
    }[name]
    if name == "gpt2":
        base = dict(vocab_size=V, n_embd=D, n_layer=L, n_head=H, n_positions=T, n_inner=F, resid_pdrop=0.0,
                    embd_pdrop=0.0, attn_pdrop=0.0)
    else:
        base = dict(vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=H, intermediate_size=F,
                    max_position_embeddings=T)
        if name == "bert":
            base.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        else:
            base.update(num_key_value_heads=2)
        if name in ("qwen3", "gemma2"):
            base.update(head_dim=D // H)
    return cls(cfg(**{**base, **kw})).eval()


FAMILIES = ["own", "bert", "gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma2"]
# projections per MLP layer: own fc1/fc2, BERT intermediate/output, GPT-2 c_fc/c_proj, gated: gate/up/down
PROJS = {"own": 2, "bert": 2, "gpt2": 2}


def build(name: str):
    torch.manual_seed(0)
    return _own().eval() if name == "own" else _hf(name)


def batch_for(name: str) -> dict:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, V, (N, T), generator=g)
    if name in ("own", "bert"):
        labels = torch.where(torch.rand(N, T, generator=g) < 0.3, ids, torch.full_like(ids, -100))
        labels[:, 1] = ids[:, 1]
        return {"input_ids": ids, "labels": labels}
    return {"input_ids": ids, "labels": ids.clone()}


def logits(model, ids):
    return model.logits(ids) if isinstance(model, Transformer) else model(input_ids=ids).logits


def probe_fn_for(name: str):
    if name == "own":
        from mat_ds.adapters import own
        return own.probe_fn(MATConfig())
    return hf_probe_fn("masked_lm" if name == "bert" else "causal_lm", "loss")


@pytest.mark.parametrize("name", FAMILIES)
def test_conversion_keeps_the_function_and_lists_mlp_units(name):
    model = build(name)
    ids = batch_for(name)["input_ids"]
    with torch.no_grad():
        before = logits(model, ids)
    conv = mat_ds.convert_model(model, mlp_groups=4)
    with torch.no_grad():
        after = logits(model, ids)
    assert float((before - after).abs().max()) <= 1e-6
    units = find_units(model)
    assert [u.name for u in units.mlp] == [f"L{l}G{g}" for l in range(L) for g in range(4)]
    assert all(len(mods) == PROJS.get(name, 3) and all(m.kind == "mlp" for m in mods)
               for mods in units.mlp_layers.values())
    assert sorted(units.mlp_layers) == sorted(units.attention_layers) == list(range(L))  # same layer tags as heads
    assert conv.replaced  # optimizer groups of the unconverted model can be remapped
    assert not mat_ds.convert_model(model, mlp_groups=4).replaced  # idempotent
    with pytest.raises(ConfigError, match="already converted with 4 MLP units"):
        mat_ds.convert_model(model, mlp_groups=2)


@pytest.mark.parametrize("name", ["own", "bert", "gpt2", "llama"])
@pytest.mark.parametrize("gram", ["materialized", "ghost"])
def test_mlp_lambda_matches_explicit_jacobian(name, gram):
    model = build(name)
    mat_ds.convert_model(model, mlp_groups=2)
    units = find_units(model)
    batch, fn = batch_for(name), probe_fn_for(name)
    result = probe_units(model, units, batch, fn, gram=gram, mlp=True)
    oracle = explicit_unit_grams(model, units.mlp, batch, fn)
    lam, ref = lambda_max(result.mlp_grams), lambda_max(oracle)
    assert result.mlp_grams.shape == (2 * L, N, N)
    assert float(((lam - ref).abs() / ref).max()) < 1e-4
    assert float((result.mlp_grams - oracle).abs().max() / oracle.abs().max()) < 1e-4
    # heads are measured in the same pass, unchanged by the MLP units
    heads_only = probe_units(model, units, batch, fn, gram=gram)
    assert heads_only.mlp_grams is None
    assert torch.allclose(heads_only.head_grams, result.head_grams, rtol=1e-6, atol=0)


def test_frozen_mlp_units_get_no_weight_gradient():
    model = build("llama")
    mat_ds.convert_model(model, mlp_groups=4)
    units = find_units(model)
    frozen = {units.mlp[1].name, units.mlp[6].name}
    for u in units.mlp:
        for p in u.params:
            p.requires_grad_(u.name not in frozen)
    batch = batch_for("llama")
    model(**batch).loss.backward()
    for u in units.mlp:
        assert all((p.grad is None) == (u.name in frozen) for p in u.params), u.name
    down = model.model.layers[0].mlp.down_proj
    assert isinstance(down, HeadwiseLinear) and down.kind == "mlp" and down.split == "in"


def test_flops_charge_exactly_the_frozen_mlp_units():
    cfg = ModelConfig(n_layer=2, n_head=4, d_model=D, d_ff=F, dropout=0.0)
    f = FlopsModel(cfg, vocab_size=V, seq_len=T)
    assert f.mlp_unit_weights(4) == 2 * D * F // 4
    assert f.train_per_token(0) - f.train_per_token(0, n_frozen_mlp=3, mlp_groups=4) == 2 * 3 * f.mlp_unit_weights(4)
    assert f.train_step(10, 1, 0, 0, 2, 4) == 10 * (f.train_per_token(0) - 2 * f.head_weights
                                                     - 2 * 2 * f.mlp_unit_weights(4))
    # against the profiler: the converted model with frozen heads and MLP units
    torch.manual_seed(0)
    model = Transformer(cfg, vocab_size=V, max_seq_len=T)
    mat_ds.convert_model(model, mlp_groups=4)
    units = find_units(model)
    frozen_h, frozen_m = {0, 5}, {1, 2, 7}
    for i, u in enumerate(units.heads):
        for p in u.params:
            p.requires_grad_(i not in frozen_h)
    for i, u in enumerate(units.mlp):
        for p in u.params:
            p.requires_grad_(i not in frozen_m)
    ids = torch.randint(0, V, (2, T))
    with torch.profiler.profile(with_flops=True) as prof:
        model(ids, ids).backward()
    counted = sum(e.flops for e in prof.key_averages() if e.flops and e.key in ("aten::mm", "aten::addmm",
                                                                                  "aten::matmul", "aten::linear"))
    expected = 2 * T * (f.train_per_token(len(frozen_h), 0, len(frozen_m), 4) - 3 * f.attention_core)
    assert abs(counted - expected) / expected < 0.02, (counted, expected)


def test_bad_mlp_groups_and_missing_mlp_are_one_line_errors():
    with pytest.raises(ConfigError, match="mlp_groups"):
        MATConfig.from_dict({"mlp_groups": 0})
    with pytest.raises(ConfigError, match="does not divide the MLP width 64"):
        mat_ds.convert_model(build("gpt2"), mlp_groups=3)
    # "mlp" on a model with no dense MLP (a tiny model marked by hand, attention only): one line, before DeepSpeed
    from mat_ds.wrapper import prepare_model

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    mat_ds.make_headwise(model, 0, out_proj=["0"], in_proj=["1"], n_units=2)
    with pytest.raises(ConfigError) as exc:
        prepare_model(model, {}, MATConfig.from_dict({"modules": ["heads", "mlp"]}))
    assert "found no MLP blocks" in str(exc.value) and "\n" not in str(exc.value)


def test_make_headwise_marks_a_users_own_mlp():
    model = torch.nn.ModuleDict({"up": torch.nn.Linear(8, 16), "gate": torch.nn.Linear(8, 16),
                                 "down": torch.nn.Linear(16, 8)})
    mat_ds.make_headwise(model, 3, out_proj=["up", "gate"], in_proj=["down"], n_units=4, kind="mlp")
    units = find_units(model)
    assert not units.heads and [u.name for u in units.mlp] == ["L3G0", "L3G1", "L3G2", "L3G3"]
    # up and gate rows with their bias entries, down's input columns (its bias is shared: no unit's)
    assert len(units.mlp[0].params) == 5
    with pytest.raises(ConfigError, match="kind="):
        mat_ds.make_headwise(model, 3, out_proj=[], in_proj=[], n_units=4, kind="ffn")
