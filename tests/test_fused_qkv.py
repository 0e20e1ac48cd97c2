"""Fused-QKV families (``mat_ds/adapters/hf_neox.py``: GPT-NeoX per-head [q|k|v]; ``hf_phi3.py``: Phi-3 blocked
[Q|K|V] with grouped KV heads): ``convert_model`` keeps the function and the gradients, is idempotent, lists H (NeoX) /
H_kv (Phi-3) units per layer, the units mean the same heads in both projections of a layer, λmax per unit from the
probe equals the explicit Jacobian's, and freezing a unit leaves every other gradient exactly as in the unconverted
model. No family steals another's model.

Tiny random models only (never downloaded), fp32, eval mode (dropout off).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

transformers = pytest.importorskip("transformers")

import mat_ds  # noqa: E402
from mat_ds.adapters import hf_neox, hf_phi3  # noqa: E402
from mat_ds.adapters.spec import registered, resolve  # noqa: E402
from mat_ds.core.headwise import HeadwiseLinear, headwise_layers  # noqa: E402
from mat_ds.core.mntk import lambda_max, probe_units  # noqa: E402
from mat_ds.core.probe import hf_probe_fn  # noqa: E402
from mat_ds.core.units import find_units  # noqa: E402
from tests.oracles import explicit_head_grams  # noqa: E402

V, D, L, H, T, B = 100, 32, 2, 4, 8, 2


@dataclass
class Case:
    name: str
    build: Callable[[], torch.nn.Module]
    family: str
    units: int  # MAT units per layer
    padded: bool = False


def _neox(**kw):
    return transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=H, intermediate_size=64,
        max_position_embeddings=T, **kw))


def _neox_japanese():
    return transformers.GPTNeoXJapaneseForCausalLM(transformers.GPTNeoXJapaneseConfig(
        vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=H, intermediate_multiple_size=2,
        max_position_embeddings=T, attention_dropout=0.0, hidden_dropout=0.0))


def _phi3(kv=2, **kw):
    return transformers.Phi3ForCausalLM(transformers.Phi3Config(
        vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=H, num_key_value_heads=kv,
        intermediate_size=64, max_position_embeddings=T, pad_token_id=0, bos_token_id=1, eos_token_id=2, **kw))


CASES = [
    Case("neox", _neox, "hf_neox", H),  # attention_bias=True, rotary_pct 0.25 (the defaults)
    Case("neox_nobias_fullrot", lambda: _neox(attention_bias=False, rotary_pct=1.0), "hf_neox", H),
    Case("neox_half_rot_eager", lambda: _neox(rotary_pct=0.5, use_parallel_residual=False,
                                               attn_implementation="eager"), "hf_neox", H, padded=True),
    Case("neox_japanese", _neox_japanese, "hf_neox", H),
    Case("phi3_gqa", _phi3, "hf_phi3", 2),
    Case("phi3_gqa_eager_partial_rot", lambda: _phi3(partial_rotary_factor=0.5, attn_implementation="eager"),
         "hf_phi3", 2, padded=True),
    Case("phi3_mha", lambda: _phi3(kv=H), "hf_phi3", H),
]
ids = [c.name for c in CASES]

# Models of the other families: the new adapters must not match them (and they must not match ours: see below).
OTHERS = {
    "hf_bert": lambda: transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=H, intermediate_size=64)),
    "hf_gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=V, n_embd=D, n_layer=L, n_head=H, n_positions=T)),
    "hf_llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=H, num_key_value_heads=2,
        intermediate_size=64)),
}


def _make(case: Case):
    torch.manual_seed(0)
    model = case.build().float().eval()
    with torch.no_grad():  # away from init (zero biases, identical-looking heads): a trained-looking model
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
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
    out: dict[int, list[HeadwiseLinear]] = {}
    for m in headwise_layers(model):
        out.setdefault(m.layer, []).append(m)
    return out


def _ref_grad(ref, name: str, m: HeadwiseLinear, pname: str) -> torch.Tensor:
    """The unconverted model's gradient of converted parameter ``pname`` of head-wise linear ``name``."""
    orig = ref.get_submodule(name)
    if pname == "bias":
        return orig.bias.grad
    u = int(pname[1:])
    lay = m.unit_layout()[u]
    if pname[0] == "b":
        return orig.bias.grad[lay]
    return orig.weight.grad[lay] if m.split == "out" else orig.weight.grad[:, lay]


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_function_and_grads_preserved(case):
    model, batch = _make(case)
    ref = copy.deepcopy(model)
    conversion = mat_ds.convert_model(model)
    assert conversion.family == case.family
    ref_loss, ref_logits = _loss(ref, batch)
    loss, logits = _loss(model, batch)
    assert (logits - ref_logits).abs().max().item() <= 1e-6
    ref_loss.backward()
    loss.backward()
    mods = [(n, m) for n, m in model.named_modules() if isinstance(m, HeadwiseLinear)]
    assert len(mods) == 2 * L
    for name, m in mods:
        orig = ref.get_submodule(name)
        assert torch.equal(m.full_weight(), orig.weight)
        assert (m.full_bias() is None) == (orig.bias is None)
        if orig.bias is not None:
            assert torch.equal(m.full_bias(), orig.bias)
        for pname, p in m.named_parameters():
            torch.testing.assert_close(p.grad, _ref_grad(ref, name, m, pname), atol=1e-6, rtol=0)
    # Every old parameter maps to its new pieces (optimizer groups can be remapped).
    assert len(conversion.replaced) == sum(1 + (m.full_bias() is not None) for _, m in mods)


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_units_idempotence_objective(case):
    model, batch = _make(case)
    mat_ds.convert_model(model)
    layers = _by_layer(model)
    assert sorted(layers) == list(range(L))
    for mods in layers.values():
        assert sorted(m.split for m in mods) == ["in", "out"]
        assert {m.n_units for m in mods} == {case.units}
    units = find_units(model)
    assert len(units.heads) == L * case.units
    assert [(u.layer, u.index) for u in units.heads] == [(la, u) for la in range(L) for u in range(case.units)]
    assert {len(ms) for ms in units.attention_layers.values()} == {2}
    params = [id(p) for p in model.parameters()]
    with torch.no_grad():
        before = model(**batch).logits
        conversion = mat_ds.convert_model(model)  # second call: no-op
        assert conversion.family == case.family and not conversion.replaced
        assert resolve(model)[0].convert(model) == 0
        assert [id(p) for p in model.parameters()] == params
        assert torch.equal(model(**batch).logits, before)
    assert resolve(model)[0].matches(model)  # still recognised once converted
    assert resolve(model)[0].objective(model) == "causal_lm"


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_no_family_steals_another(case):
    model, _ = _make(case)
    assert [s.name for s in registered() if not s.additional and s.matches(model)] == [case.family]


@pytest.mark.parametrize("family", sorted(OTHERS))
def test_new_families_reject_other_models(family):
    torch.manual_seed(0)
    model = OTHERS[family]()
    assert not hf_neox.matches(model) and not hf_phi3.matches(model)
    assert mat_ds.convert_model(model).family == family


def test_phi3_layout_is_kv_group():
    """H=4, H_kv=2, k=8: group 1 = q heads 2,3 (rows 16..31), k head 1 (rows 40..47), v head 1 (rows 56..63)."""
    lay = hf_phi3.qkv_layout(4, 2, 8)
    assert lay.shape == (2, 4 * 8)
    assert torch.equal(lay[1], torch.cat([torch.arange(16, 32), torch.arange(40, 48), torch.arange(56, 64)]))
    assert torch.equal(lay.flatten().sort().values, torch.arange(64))


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_unit_meaning_consistent_within_layer(case):
    """Perturbing unit u of a layer's fused QKV changes the attention output ONLY in the output projection's input
    channels of unit u: both projections' units are the same heads (KV groups)."""
    model, batch = _make(case)
    mat_ds.convert_model(model)
    ((qkv,), (out,)) = ([m for m in _by_layer(model)[0] if m.split == s] for s in ("out", "in"))
    seen = []
    out.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    with torch.no_grad():
        model(**batch)
        for u in range(case.units):
            saved = [p.clone() for p in qkv.unit_params(u)]
            for p in qkv.unit_params(u):
                p.add_(torch.randn_like(p))
            model(**batch)
            changed = (seen[-1] - seen[0]).abs().amax(dim=(0, 1)) > 1e-6
            expect = torch.zeros_like(changed)
            expect[out.unit_layout()[u]] = True
            assert torch.equal(changed, expect), f"unit {u}"
            for p, s in zip(qkv.unit_params(u), saved):
                p.copy_(s)


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_lambda_max_matches_explicit_jacobian(case):
    model, batch = _make(case)
    mat_ds.convert_model(model)
    units = find_units(model)
    batch = {**batch, "labels": batch["input_ids"].clone()}
    if case.padded:
        batch["labels"][batch["attention_mask"] == 0] = -100
    probe_fn = hf_probe_fn("causal_lm", "loss")
    ref = lambda_max(explicit_head_grams(model, units, batch, probe_fn))
    lam = probe_units(model, units, batch, probe_fn).head_lambda_max()
    assert lam.shape == (L * case.units,)
    assert torch.all(ref > 0) and ref.std() > 0
    assert ((lam - ref).abs() / ref).max() < 1e-4


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_frozen_unit_other_grads_unchanged(case):
    """A frozen unit (all its params requires_grad False) gets no gradient; every other parameter's gradient is the
    unconverted model's, to fp32 rounding."""
    model, batch = _make(case)
    ref = copy.deepcopy(model)
    mat_ds.convert_model(model)
    layer, unit = L - 1, case.units - 1
    frozen = set()
    for m in _by_layer(model)[layer]:
        for p in m.unit_params(unit):
            p.requires_grad_(False)
            frozen.add(id(p))
    _loss(ref, batch)[0].backward()
    _loss(model, batch)[0].backward()
    n_hw = 0
    for name, m in model.named_modules():
        if isinstance(m, HeadwiseLinear):
            for pname, p in m.named_parameters():
                if id(p) in frozen:
                    assert p.grad is None
                else:
                    torch.testing.assert_close(p.grad, _ref_grad(ref, name, m, pname), atol=1e-6, rtol=0)
                    n_hw += 1
    ref_params = dict(ref.named_parameters())
    n_other = 0
    for pname, p in model.named_parameters():
        if pname in ref_params:  # not a converted projection's: embeddings, norms, MLP, lm head
            torch.testing.assert_close(p.grad, ref_params[pname].grad, atol=1e-6, rtol=0)
            n_other += 1
    assert n_hw > 0 and n_other > 0


# -- a user's own fused QKV through make_headwise ----------------------------------------------------------------------
class _FusedAttention(torch.nn.Module):
    """A user's GQA attention with ONE fused QKV linear: ``blocked`` rows [Q | K | V] (GPT-2/Phi-3 style), or
    ``interleaved`` per KV group [q heads of g | k_g | v_g] (Megatron-Core's ``linear_qkv``, GPT-NeoX)."""

    def __init__(self, d: int, H: int, H_kv: int, layout: str):
        super().__init__()
        self.H, self.H_kv, self.k, self.layout = H, H_kv, d // H, layout
        self.qkv = torch.nn.Linear(d, (H + 2 * H_kv) * self.k)
        self.proj = torch.nn.Linear(H * self.k, d)

    def forward(self, x):
        B, T, _ = x.shape
        H, G, k, r = self.H, self.H_kv, self.k, self.H // self.H_kv
        y = self.qkv(x)
        if self.layout == "blocked":
            q, kk, v = y.split([H * k, G * k, G * k], dim=-1)
            q, kk, v = q.view(B, T, H, k), kk.view(B, T, G, k), v.view(B, T, G, k)
        else:
            y = y.view(B, T, G, (r + 2) * k)
            q, kk, v = y.split([r * k, k, k], dim=-1)
            q = q.reshape(B, T, H, k)
        kk, v = kk.repeat_interleave(r, dim=2), v.repeat_interleave(r, dim=2)
        att = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), kk.transpose(1, 2),
                                                               v.transpose(1, 2), is_causal=True)
        return self.proj(att.transpose(1, 2).reshape(B, T, H * k))


class _UserLM(torch.nn.Module):
    def __init__(self, layout: str, V: int = 50, d: int = 16, H: int = 4, H_kv: int = 2, n_layer: int = 2):
        super().__init__()
        self.emb = torch.nn.Embedding(V, d)
        self.blocks = torch.nn.ModuleList(_FusedAttention(d, H, H_kv, layout) for _ in range(n_layer))
        self.head = torch.nn.Linear(d, V)

    def forward(self, input_ids):
        h = self.emb(input_ids)
        for b in self.blocks:
            h = h + b(h)
        return self.head(h)


@pytest.mark.parametrize("layout", ["blocked", "interleaved"])
def test_make_headwise_marks_a_users_fused_qkv(layout):
    torch.manual_seed(0)
    model = _UserLM(layout).eval()
    ids = torch.randint(0, 50, (5, 8))
    with torch.no_grad():
        before = model(ids)
    H, G, k = 4, 2, 4
    for l in range(2):
        blocks = {f"blocks.{l}.qkv": [H * k, G * k, G * k]} if layout == "blocked" else None
        mat_ds.make_headwise(model, l, out_proj=[f"blocks.{l}.qkv"], in_proj=[f"blocks.{l}.proj"], n_units=G,
                             blocks=blocks)
    with torch.no_grad():
        assert float((model(ids) - before).abs().max()) <= 1e-6
    units = find_units(model)
    assert [u.name for u in units.heads] == ["L0H0", "L0H1", "L1H0", "L1H1"]

    def fn(m, batch):  # per-sample mean next-token loss
        logits = m(batch["input_ids"])[:, :-1]
        tgt = batch["input_ids"][:, 1:]
        return torch.nn.functional.cross_entropy(logits.transpose(1, 2), tgt, reduction="none").mean(1)

    batch = {"input_ids": ids}
    lam = lambda_max(probe_units(model, units, batch, fn).head_grams)
    ref = lambda_max(explicit_head_grams(model, units, batch, fn))
    assert float(((lam - ref).abs() / ref).max()) < 1e-4
    # blocked: KV group 1 owns its query heads' rows of Q and its own K and V rows
    if layout == "blocked":
        qkv = model.blocks[0].qkv
        lay = qkv.unit_layout()
        assert lay[1].tolist() == [*range(8, 16), *range(20, 24), *range(28, 32)]


def test_make_headwise_blocks_are_checked():
    model = _UserLM("blocked")
    with pytest.raises(mat_ds.ConfigError, match="sum to 20"):
        mat_ds.make_headwise(model, 0, out_proj=["blocks.0.qkv"], in_proj=["blocks.0.proj"], n_units=2,
                             blocks={"blocks.0.qkv": [16, 2, 2]})
    with pytest.raises(mat_ds.ConfigError, match="not in out_proj"):
        mat_ds.make_headwise(model, 0, out_proj=[], in_proj=["blocks.0.proj"], n_units=2,
                             blocks={"blocks.0.qkv": [16, 4, 4]})
