"""HF model-family adapters (mat_ds/adapters/hf_*.py): conversion keeps the function and the gradients, tags every
layer's projections with one consistent unit meaning, is idempotent, and frozen units get no gradient.

Tiny random models only (never downloaded), fp32, eval mode (no dropout) so outputs are deterministic.
"""
from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mat_ds.adapters import hf_bert, hf_gpt2, hf_llama  # noqa: E402
from mat_ds.core.headwise import HeadwiseLinear, headwise_layers  # noqa: E402

V, D, L, H, T, B = 100, 32, 2, 4, 8, 2


@dataclass
class Case:
    name: str
    build: Callable[[], torch.nn.Module]
    adapter: object
    units: int          # MAT units per layer
    projs: int          # head-wise linears per layer
    objective: str
    padded: bool = False  # feed an attention mask with padding


def _bert():
    return transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=H, intermediate_size=64))


def _roberta():
    return transformers.RobertaForMaskedLM(transformers.RobertaConfig(
        vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=H, intermediate_size=64,
        max_position_embeddings=T + 4))


def _bert_decoder():  # BertLMHeadModel with cross-attention blocks, which must stay unconverted
    return transformers.BertLMHeadModel(transformers.BertConfig(
        vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=H, intermediate_size=64,
        is_decoder=True, add_cross_attention=True))


def _gpt2(**kw):
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=V, n_embd=D, n_layer=L, n_head=H, n_positions=T, **kw))


def _llama(kv=2, **kw):
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=H, num_key_value_heads=kv,
        intermediate_size=64, **kw))


def _mistral():
    return transformers.MistralForCausalLM(transformers.MistralConfig(
        vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=H, num_key_value_heads=2,
        intermediate_size=64))


def _qwen2():  # bias on q/k/v only
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=H, num_key_value_heads=2,
        intermediate_size=64))


CASES = [
    Case("bert", _bert, hf_bert, H, 4, "masked_lm", padded=True),
    Case("roberta", _roberta, hf_bert, H, 4, "masked_lm", padded=True),
    Case("bert_decoder", _bert_decoder, hf_bert, H, 4, "causal_lm"),
    Case("gpt2", _gpt2, hf_gpt2, H, 2, "causal_lm"),
    Case("gpt2_cross", lambda: _gpt2(add_cross_attention=True), hf_gpt2, H, 2, "causal_lm"),
    Case("llama_gqa", _llama, hf_llama, 2, 4, "causal_lm"),
    Case("llama_gqa_eager", lambda: _llama(attn_implementation="eager"), hf_llama, 2, 4, "causal_lm", padded=True),
    Case("llama_mha_bias", lambda: _llama(kv=H, attention_bias=True), hf_llama, H, 4, "causal_lm"),
    Case("mistral", _mistral, hf_llama, 2, 4, "causal_lm"),
    Case("qwen2", _qwen2, hf_llama, 2, 4, "causal_lm"),
]
ids = [c.name for c in CASES]


def _make(case: Case):
    torch.manual_seed(0)
    model = case.build().float().eval()
    g = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.randint(3, V, (B, T), generator=g)}
    if case.padded:
        mask = torch.ones(B, T, dtype=torch.long)
        mask[1, -3:] = 0  # right padding in the second sequence
        batch["attention_mask"] = mask
    return model, batch


def _loss(model, batch):
    logits = model(**batch).logits
    w = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2))
    return (logits * w).sum(), logits


def _by_layer(model) -> dict[int, list[HeadwiseLinear]]:
    out = defaultdict(list)
    for m in headwise_layers(model):
        out[m.layer].append(m)
    return dict(out)


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_function_and_grads_preserved(case):
    model, batch = _make(case)
    ref = copy.deepcopy(model)
    assert case.adapter.matches(model)
    assert case.adapter.convert(model) == L
    ref_loss, ref_logits = _loss(ref, batch)
    loss, logits = _loss(model, batch)
    assert (logits - ref_logits).abs().max().item() <= 1e-6
    ref_loss.backward()
    loss.backward()
    n_checked = 0
    for name, m in model.named_modules():
        if not isinstance(m, HeadwiseLinear):
            continue
        orig = ref.get_submodule(name)
        conv1d = type(orig).__name__ == "Conv1D"  # weight [d_in, d_out]
        W, dW = (orig.weight.t(), orig.weight.grad.t()) if conv1d else (orig.weight, orig.weight.grad)
        assert torch.equal(m.full_weight(), W)
        lay = m.unit_layout()
        for u in range(m.n_units):
            ref_dw = dW[lay[u]] if m.split == "out" else dW[:, lay[u]]
            torch.testing.assert_close(getattr(m, f"w{u}").grad, ref_dw, atol=1e-6, rtol=0)
            if m.has_unit_bias:
                torch.testing.assert_close(getattr(m, f"b{u}").grad, orig.bias.grad[lay[u]], atol=1e-6, rtol=0)
        if orig.bias is None:
            assert m.full_bias() is None
        else:
            assert torch.equal(m.full_bias(), orig.bias)
            if m.bias is not None:  # shared bias of split "in"
                torch.testing.assert_close(m.bias.grad, orig.bias.grad, atol=1e-6, rtol=0)
        n_checked += 1
    assert n_checked == L * case.projs


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_units_tags_idempotence_objective(case):
    model, batch = _make(case)
    case.adapter.convert(model)
    layers = _by_layer(model)
    assert sorted(layers) == list(range(L))
    for mods in layers.values():
        assert len(mods) == case.projs
        assert {m.n_units for m in mods} == {case.units}
        assert {m.split for m in mods} == {"out", "in"}
    params = [id(p) for p in model.parameters()]
    with torch.no_grad():
        before = model(**batch).logits
        assert case.adapter.convert(model) == 0  # second call: no-op
        assert [id(p) for p in model.parameters()] == params
        assert torch.equal(model(**batch).logits, before)
    assert case.adapter.matches(model)  # still recognised once converted
    assert case.adapter.objective(model) == case.objective


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_matches_rejects_other_families(case):
    model, _ = _make(case)
    for other in (hf_bert, hf_gpt2, hf_llama):
        assert other.matches(model) == (other is case.adapter)


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_frozen_unit_gets_no_grad(case):
    model, batch = _make(case)
    case.adapter.convert(model)
    layer, unit = L - 1, 1
    frozen = {id(p) for m in _by_layer(model)[layer] for p in m.unit_params(unit)}
    for m in _by_layer(model)[layer]:
        for p in m.unit_params(unit):
            p.requires_grad_(False)
    _loss(model, batch)[0].backward()
    for m in headwise_layers(model):
        for u in range(m.n_units):
            for p in m.unit_params(u):
                assert (p.grad is None) == (id(p) in frozen)


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_unit_meaning_consistent_within_layer(case):
    """Perturbing unit u of a layer's input-side projections (Q/K/V) changes the attention output ONLY in the input
    channels that unit u owns in the same layer's output projection: the units of a layer mean the same heads."""
    model, batch = _make(case)
    case.adapter.convert(model)
    layer = 0
    mods = _by_layer(model)[layer]
    (o_proj,) = [m for m in mods if m.split == "in"]
    seen = []
    o_proj.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    with torch.no_grad():
        model(**batch)
        for u in range(case.units):
            saved = [p.clone() for m in mods if m.split == "out" for p in m.unit_params(u)]
            for m in mods:
                if m.split == "out":
                    for p in m.unit_params(u):
                        p.add_(torch.randn_like(p))
            model(**batch)
            changed = (seen[-1] - seen[0]).abs().amax(dim=(0, 1)) > 1e-6  # per input channel of o_proj
            expect = torch.zeros_like(changed)
            expect[o_proj.unit_layout()[u]] = True
            assert torch.equal(changed, expect), f"unit {u}"
            it = iter(saved)
            for m in mods:
                if m.split == "out":
                    for p in m.unit_params(u):
                        p.copy_(next(it))


def test_a_registered_family_is_resolved_once_and_drives_initialize_defaults():
    # A family of the user's own (one FamilySpec, no mat_ds file touched): convert_model finds it, converts with it,
    # and the Conversion answers objective / TP support / layer path from the same spec.
    from torch import nn

    import mat_ds
    from mat_ds.adapters import spec as registry
    from mat_ds.core.config import MATConfig

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.o = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return self.o(torch.relu(self.q(x)))

    def convert(model):
        mat_ds.make_headwise(model, layer=0, out_proj=["q"], in_proj=["o"], n_units=2)
        return 1

    spec = mat_ds.FamilySpec(name="tiny_test", matches=lambda m: isinstance(m, Tiny), convert=convert,
                             objective=lambda m: "causal_lm")
    mat_ds.register_family(spec)
    try:
        model = Tiny()
        x = torch.randn(3, 8)
        before = model(x)
        conversion = mat_ds.convert_model(model)
        assert conversion.spec is spec and conversion.family == "tiny_test"
        assert len(list(mat_ds.adapters.headwise_layers(model))) == 2
        assert torch.allclose(model(x), before, atol=1e-6)
        assert conversion.tensor_parallel_kinds() == () and conversion.layer_path(model) is None
        assert callable(conversion.probe_fn(model, MATConfig()))
        with pytest.raises(mat_ds.ConfigError, match="built-in"):
            mat_ds.register_family(mat_ds.FamilySpec(name="hf_bert", matches=spec.matches, convert=convert))
        mat_ds.register_family(mat_ds.FamilySpec(name="tiny_twin", matches=spec.matches, convert=convert))
        with pytest.raises(mat_ds.ConfigError, match="several model families"):
            mat_ds.convert_model(Tiny())
    finally:
        registry._REGISTRY.pop("tiny_test", None)
        registry._REGISTRY.pop("tiny_twin", None)
