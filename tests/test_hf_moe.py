"""MAT for Hugging Face MoE models with fused experts and top-k routing (``mat_ds/adapters/hf_moe.py``,
``mat_ds/core/fused_experts.py``).

Single process (tiny random models from configs, fp32, eval mode):

* ``convert_model`` converts the attention (``hf_llama``) AND the fused experts (``hf_moe``): logits unchanged
  (<= 1e-6), gradients of every expert equal to the slices of the fused original's gradients (experts no token reached
  included: zeros), optimizer-parameter remapping complete, conversion idempotent;
* a frozen expert (``requires_grad_(False)``) gets ``.grad is None``; the others keep the fused original's gradients;
* ``find_units`` lists experts ``L{layer}E{e}`` and ``probe_units(..., experts=True)`` gives per-expert Grams and λmax
  equal to explicit per-sample Jacobians (relative error < 1e-4) with top-2 routing;
* families whose experts compute something else (GPT-OSS) are not matched.

Two ranks (``tests/scripts/hf_moe_check.py`` through the real launcher, ZeRO-2, ``mat_ds.initialize``): λmax vs the
explicit Jacobian, frozen experts' weights and Adam state unchanged by exactly 0, gradient bytes drop by exactly
A·4·frozen numel, loss falls over MAT steps, and deepspeed.moe experts unchanged next to it.
"""
from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mat_ds.adapters import convert_model, hf_llama, hf_moe  # noqa: E402
from mat_ds.core.headwise import headwise_layers  # noqa: E402
from mat_ds.core.mntk import lambda_max, probe_units  # noqa: E402
from mat_ds.core.probe import hf_probe_fn  # noqa: E402
from mat_ds.core.units import find_units  # noqa: E402
from tests.launcher import REPO, run_deepspeed, tagged_json  # noqa: E402
from tests.oracles import explicit_unit_grams  # noqa: E402

V, T, N = 64, 8, 4
COMMON = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=16, num_experts_per_tok=2)


def _build(family: str):
    t = transformers
    if family == "mixtral":
        return t.MixtralForCausalLM(t.MixtralConfig(intermediate_size=48, num_local_experts=4, **COMMON))
    if family == "qwen2_moe":  # shared expert, no top-k renormalisation, layer 1 dense
        return t.Qwen2MoeForCausalLM(t.Qwen2MoeConfig(
            intermediate_size=48, moe_intermediate_size=24, shared_expert_intermediate_size=40, num_experts=4,
            decoder_sparse_step=1, mlp_only_layers=[1], norm_topk_prob=False, **COMMON))
    if family == "qwen3_moe":
        return t.Qwen3MoeForCausalLM(t.Qwen3MoeConfig(intermediate_size=48, moe_intermediate_size=24, num_experts=4,
                                                      head_dim=8, norm_topk_prob=True, **COMMON))
    if family == "olmoe":
        return t.OlmoeForCausalLM(t.OlmoeConfig(intermediate_size=24, num_experts=4, eos_token_id=None, **COMMON))
    if family == "phimoe":
        return t.PhimoeForCausalLM(t.PhimoeConfig(intermediate_size=24, num_local_experts=4, **COMMON))
    raise ValueError(family)


FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "phimoe")
MOE_LAYERS = {"qwen2_moe": [0]}  # decoder layers with experts (default: all)


def build(family: str, seed: int = 0):
    torch.manual_seed(seed)
    model = _build(family).eval()
    with torch.no_grad():  # HF inits tiny weights (std 0.02): make the experts differ visibly
        for m in model.modules():
            if hf_moe.is_fused_experts(m):
                m.gate_up_proj.normal_(0, 0.2)
                m.down_proj.normal_(0, 0.2)
    return model


def batch(seed: int = 3, n: int = N) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (n, T), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def fused_modules(model):
    return [(name, m) for name, m in model.named_modules() if hf_moe.is_fused_experts(m)]


def converted(family: str):
    ref = build(family)
    model = copy.deepcopy(ref)
    before = list(model.parameters())  # what a user would pass as model_parameters
    conversion = convert_model(model)
    conversion.before = before
    return ref, model, conversion


@pytest.fixture(scope="module", params=FAMILIES)
def case(request):
    return (request.param, *converted(request.param))


def test_conversion_keeps_function_and_gradients(case):
    family, ref, model, conversion = case
    assert hf_llama.matches(ref) and hf_moe.matches(ref)
    assert conversion.family == "hf_llama"
    layers = MOE_LAYERS.get(family, [0, 1])
    fused = fused_modules(ref)
    assert len(fused) == len(layers) and not fused_modules(model)
    assert len(headwise_layers(model)) == 4 * 2  # attention converted too (q/k/v/o of 2 layers)
    assert sum(p.numel() for p in ref.parameters()) == sum(p.numel() for p in model.parameters())
    b = batch()
    out_ref, out = ref(**b), model(**b)
    diff = float((out_ref.logits - out.logits).detach().abs().max())
    print(f"{family}: max |Δlogit| = {diff:.2e}")
    assert diff <= 1e-6
    out_ref.loss.backward()
    out.loss.backward()
    for (name, f), layer in zip(fused, layers):
        per = model.get_submodule(name)
        assert isinstance(per, hf_moe.PerExpertExperts) and per.layer == layer and len(per) == f.gate_up_proj.shape[0]
        for e, ex in enumerate(per):
            for mine, theirs in ((ex.gate_up_proj, f.gate_up_proj), (ex.down_proj, f.down_proj)):
                assert mine.grad is not None  # every expert every step, also without tokens (ZeRO hook order)
                torch.testing.assert_close(mine.grad, theirs.grad[e], rtol=1e-5, atol=1e-7)
    # optimizer parameter lists of the unconverted model are remapped to the pieces, all of them
    remapped = conversion.remap(conversion.before)
    assert sorted(id(p) for p in remapped) == sorted(id(p) for p in model.parameters())  # each once, none missing
    # idempotent
    again = convert_model(model)
    assert again.replaced == {} and hf_moe.convert(model) == 0
    with torch.no_grad():
        assert torch.equal(model(**b).logits, out.logits)


def test_frozen_expert_gets_no_grad_others_keep_fused_grads():
    ref, model, _ = converted("mixtral")
    frozen = {(0, 1), (1, 2)}
    pers = [m for m in model.modules() if isinstance(m, hf_moe.PerExpertExperts)]
    for layer, e in frozen:
        pers[layer][e].requires_grad_(False)
    b = batch()
    ref(**b).loss.backward()
    model(**b).loss.backward()
    for layer, ((_, f), per) in enumerate(zip(fused_modules(ref), pers)):
        for e, ex in enumerate(per):
            if (layer, e) in frozen:
                assert ex.gate_up_proj.grad is None and ex.down_proj.grad is None
            else:
                torch.testing.assert_close(ex.gate_up_proj.grad, f.gate_up_proj.grad[e], rtol=1e-5, atol=1e-7)
                torch.testing.assert_close(ex.down_proj.grad, f.down_proj.grad[e], rtol=1e-5, atol=1e-7)


def test_expert_grams_match_explicit_jacobian_top2(case):
    family, _, model, _ = case
    units = find_units(model)
    layers = MOE_LAYERS.get(family, [0, 1])
    assert [u.name for u in units.experts] == [f"L{l}E{e}" for l in layers for e in range(4)]
    assert all(len(u.params) == 2 for u in units.experts)
    b = batch()
    probe_fn = hf_probe_fn("causal_lm", "loss")
    result = probe_units(model, units, b, probe_fn, experts=True)
    oracle = explicit_unit_grams(model, units.experts, b, probe_fn)
    heads = explicit_unit_grams(model, units.heads, b, probe_fn)
    gram_err = float((result.expert_grams - oracle).abs().max() / oracle.abs().max())
    lam, lam_ref = lambda_max(result.expert_grams), lambda_max(oracle)
    lam_err = float(((lam - lam_ref).abs() / lam_ref).max())
    head_err = float((result.head_grams - heads).abs().max() / heads.abs().max())
    print(f"{family}: expert Gram rel err {gram_err:.2e}, λmax rel err {lam_err:.2e}, head Gram rel err "
          f"{head_err:.2e}; λmax {lam.tolist()}")
    assert gram_err < 1e-4 and lam_err < 1e-4 and head_err < 1e-4
    assert (lam_ref > 0).all() and len(set(lam_ref.tolist())) == len(lam_ref)  # every expert reached, all differ
    assert probe_units(model, units, b, probe_fn, experts=False).expert_grams is None


def test_top2_routing_is_what_the_probe_records():
    """Each token reaches exactly k=2 experts of each MoE layer, with the router's renormalised gate weights."""
    from mat_ds.core.fused_experts import record_fused

    _, model, _ = converted("mixtral")
    units = find_units(model)
    b = batch()
    with torch.no_grad(), record_fused(units.fused_expert_layers) as records:
        model(input_ids=b["input_ids"])
    for layer_records in records:
        counts = torch.zeros(N * T, dtype=torch.long)
        for (_e, tokens, linears) in layer_records:
            counts.index_add_(0, tokens, torch.ones_like(tokens))
            assert len(linears) == 2 and linears[0][0].shape[0] == tokens.numel()
        assert torch.equal(counts, torch.full_like(counts, 2))
    assert all(m.mat_recorder is None for m in units.fused_expert_layers)


def test_other_experts_layouts_are_not_matched():
    t = transformers
    torch.manual_seed(0)
    gpt_oss = t.GptOssForCausalLM(t.GptOssConfig(intermediate_size=24, num_local_experts=4, head_dim=8, **COMMON))
    llama = t.LlamaForCausalLM(t.LlamaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1,
                                             num_attention_heads=4, intermediate_size=48))
    assert not hf_moe.matches(gpt_oss) and not hf_moe.matches(llama)
    assert find_units(gpt_oss).experts == []


@pytest.fixture(scope="module")
def two_ranks() -> dict:
    proc = run_deepspeed(REPO / "tests" / "scripts" / "hf_moe_check.py", [], timeout=400)
    out = tagged_json(proc.stdout, "HF_MOE_CHECK")
    assert len(out) == 1, proc.stdout[-4000:]
    return out[0]


def test_two_ranks_lambda_matches_explicit_jacobian(two_ranks):
    r = two_ranks
    assert r["world"] == 2 and r["expert_types"] == ["PerExpertExperts"] and len(r["experts"]) == 8
    assert r["engine_refresh_at_step0"]
    for prefix in ("init", "engine_step0", "trained"):
        for kind in ("heads", "experts"):
            for what in ("lam", "gram"):
                key = f"{prefix}_{what}_rel_err_{kind}"
                print(key, r[key])
                assert r[key] < 1e-4, key
    assert r["expert_metric_keys"] == [f"mat/expert_lambda_max/{n}" for n in r["experts"]]
    assert r["gram_allreduce_bytes"] == (len(r["heads"]) + len(r["experts"])) * r["n_probe"] ** 2 * 4  # ONE reduce


def test_two_ranks_frozen_experts_exact_and_gradient_bytes(two_ranks):
    r = two_ranks
    assert r["frozen_units"] == r["frozen_units_api"] == ["L0E1", "L1E2"] and r["requires_grad_off"]
    assert r["frozen_weight_drift"] == 0.0 and r["frozen_change_api"] == 0.0
    assert r["frozen_state_drift"] == {"fp32": 0.0, "exp_avg": 0.0, "exp_avg_sq": 0.0}
    assert sum(rank["fragments"] for rank in r["frozen_drift_per_rank"]) >= 4  # both params of both experts seen
    assert r["trained_unmoved"] == []
    for rank in r["grad_bytes_per_rank"]:
        print(rank)
        assert len(set(rank["full"])) == 1 and len(set(rank["frozen"])) == 1
        assert rank["drop"] == rank["expected_drop"] == r["accum"] * 4 * r["frozen_numel"]


def test_two_ranks_loss_falls_and_deepspeed_moe_unchanged(two_ranks):
    r = two_ranks
    losses = r["losses"]
    print("losses", [round(x, 3) for x in losses])
    assert len(losses) >= 15 and losses[-1] < 0.8 * losses[0]
    assert len(r["policy_refreshes"]) >= 2 and r["policy_frozen_drift"] == 0.0
    assert r["switch_experts"] == 8 and r["switch_fused_layers"] == 0
    assert r["switch_gram_rel_err_experts"] < 1e-4 and r["switch_lam_rel_err_experts"] < 1e-4
