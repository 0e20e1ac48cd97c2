"""MAT on Switch-Transformer experts (``mat_ds/models/switch.py``; generic ``deepspeed.moe`` expert code in
``mat_ds/core/experts.py``; Grams from ``mntk.probe_units(..., experts=True)``), on DeepSpeed's own MoE layer.

* 2 real ranks (``tests/scripts/moe_check.py``, one launch): per-expert Gram vs explicit Jacobian for ep_size 1 and 2,
  frozen experts bit-identical with their Adam state and no weight gradient, gradient bytes drop by exactly the frozen
  experts' bytes on each rank, identical masks, the model's expert-parallel rank agrees with DeepSpeed's groups,
  ZeRO-3 + native MoE refused by ``mat_ds.initialize`` with a one-line message.
* 2-rank training runs of ``launch/pretrain.py`` with ``configs/switch_mat_ep{1,2}.json``: loss falls, experts freeze,
  frozen experts (and heads) change by exactly 0, per-expert λmax / tokens routed / active experts are logged.
* Config and FLOPs units.
"""
from __future__ import annotations

import json

import pytest

from mat_ds.config import ConfigError, ModelConfig
from mat_ds.core.config import MATConfig
from mat_ds.models.flops import FlopsModel
from mat_ds.tracking import read_metrics
from tests.launcher import REPO, run_deepspeed, tagged_json, config_template

CHECK = REPO / "tests" / "scripts" / "moe_check.py"
PAIRS = ((0, 1), (2, 1), (2, 2))  # (ZeRO stage, ep_size)


@pytest.fixture(scope="module")
def checks() -> dict:
    proc = run_deepspeed(CHECK, ["--configs", ",".join(f"{s}:{e}" for s, e in PAIRS)], timeout=300)
    out = {(r["stage"], r["ep_size"]) if "stage" in r else "zero3": r for r in tagged_json(proc.stdout, "MOE_CHECK")}
    assert set(out) == {*PAIRS, "zero3"}, proc.stdout[-4000:]
    return out


@pytest.mark.parametrize("pair", PAIRS)
def test_expert_lambda_matches_explicit_jacobian(checks, pair):
    r = checks[pair]
    print(f"ZeRO-{pair[0]} ep={pair[1]}: Gram rel err {r['gram_rel_err_init']:.2e} (init) "
          f"{r['gram_rel_err_trained']:.2e} (trained); λmax rel err {r['lambda_rel_err_trained']:.2e}")
    for key in ("gram_rel_err_init", "gram_rel_err_trained", "lambda_rel_err_init", "lambda_rel_err_trained"):
        assert r[key] < 1e-4, (key, r[key])


def test_expert_lambda_and_losses_do_not_depend_on_ep_size(checks):
    """Expert e starts with the same weights whatever ep_size is, so λmax and the loss trajectory agree."""
    assert all(checks[pair]["ep_rank_matches_deepspeed"] for pair in PAIRS)
    a, b = checks[(2, 1)], checks[(2, 2)]
    assert max(abs(x - y) / abs(y) for x, y in zip(a["lambda_init"], b["lambda_init"])) < 1e-5
    assert max(abs(x - y) for x, y in zip(a["losses"], b["losses"])) < 1e-5
    assert len(set(a["lambda_init"])) == len(a["lambda_init"])  # experts differ from each other (re-initialised)


@pytest.mark.parametrize("pair", PAIRS)
def test_frozen_experts_are_exact_and_cost_no_weight_grad(checks, pair):
    r = checks[pair]
    assert r["masks_identical"] and r["frozen_bit_identical"] and r["frozen_max_abs_dw"] == 0.0
    assert r["adam_fragments"] > 0 and r["adam_unchanged"]
    assert r["frozen_grads_none"] and r["others_changed"]
    assert r["losses"][-1] < r["losses"][0]
    if pair[1] == 1:
        assert r["expert_copies_identical"]


@pytest.mark.parametrize("pair", PAIRS)
def test_expert_gradient_bytes_drop_by_frozen_experts(checks, pair):
    """Stage 0: one reduction per step; stage 2: one per micro-batch (accum times). Per rank: its own experts."""
    r = checks[pair]
    per_step = 1 if pair[0] == 0 else r["accum"]
    assert r["grad_bytes_steady"]
    for rank in r["grad_bytes_per_rank"]:
        print(f"ZeRO-{pair[0]} ep={pair[1]}: {rank}")
        assert rank["frozen_expert_bytes"] > 0
        assert rank["drop"] == per_step * rank["frozen_expert_bytes"]


def test_zero3_with_native_moe_is_refused_with_what_to_use(checks):
    msg = checks["zero3"]["zero3_refused"]
    assert msg and "ZeRO stage 3" in msg and "stage 2" in msg and "\n" not in msg


# ----------------------------------------------------------------------------------------------------------------------
FAST = ["--n_layer", "4", "--n_head", "4", "--d_model", "64", "--seq_len", "64", "--vocab_size", "1024",
        "--eval_batches", "4", "--log_interval", "10", "--wandb_mode", "offline"]


@pytest.mark.parametrize("ep", [1, 2])
def test_switch_mat_two_ranks_trains_and_freezes_experts(tmp_path, ep):
    cfg = config_template(f"switch_mat_ep{ep}.json")
    cfg["mat"].update(warmup_steps=20, refresh_interval=10, alpha=0.3, beta=0.05)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(cfg))
    run_deepspeed("launch/pretrain.py", ["--deepspeed_config", str(path), "--out_dir", str(tmp_path / "run"),
                                         "--cache_dir", str(tmp_path / "cache"), *FAST, "--train_steps", "50",
                                         "--eval_interval", "0", "--verify_frozen", "--comm_stats"])
    rows = read_metrics(str(tmp_path / "run" / "metrics.jsonl"))
    assert [r["trainer/step"] for r in rows] == list(range(1, 51))
    losses = [r["train/loss"] for r in rows]
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.3, losses
    active = [r["mat/active_experts"] for r in rows]
    assert active[:20] == [8] * 20 and min(active[20:]) < 8  # 4 layers, every 2nd is MoE: 2 x 4 experts
    assert all(r["mat/frozen_max_abs_change"] == 0.0 for r in rows)
    lam = [r for r in rows if "mat/expert_lambda_max/L1E0" in r]
    assert len(lam) == 5
    assert all(r[f"mat/expert_lambda_max/L{l}E{e}"] > 0 for r in lam for l in (1, 3) for e in range(4))
    tokens = [sum(r[f"moe/tokens/L1E{e}"] for e in range(4)) for r in rows]
    assert set(tokens) == {2 * 8 * 64}  # every token of the step (2 ranks x 8 sequences x 64) is routed once
    assert all(0 < r["train/aux_loss"] < 4 for r in rows)
    # gradient bytes per step fall by exactly the frozen heads' and experts' fp32 bytes (ZeRO-2, no accumulation);
    # with ep 1 every rank holds every expert, with ep 2 only rank 0's (the logger's) experts count: checked with
    # per-rank sizes in moe_check.py. Token all-to-all is traffic of expert parallelism only.
    head, expert = 4 * 16 * 64, 2 * 64 * 256 + 256 + 64
    frozen_heads = 0
    for r in rows:
        frozen_heads = r.get("mat/frozen_heads", frozen_heads)
        if ep == 1:
            frozen_experts = 8 - r["mat/active_experts"]
            expected = rows[0]["perf/grad_comm_bytes"] - 4 * (frozen_heads * head + frozen_experts * expert)
            assert r["perf/grad_comm_bytes"] == expected
        assert (r["perf/moe_dispatch_bytes"] > 0) == (ep == 2)
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))


# ----------------------------------------------------------------------------------------------------------------------
def test_moe_config_validation():
    assert ModelConfig(moe_num_experts=4, n_layer=4).moe_layers == [1, 3]
    assert ModelConfig(moe_num_experts=4, n_layer=3, moe_layer_interval=1).moe_layers == [0, 1, 2]
    assert ModelConfig().moe_layers == []
    for bad in ({"moe_num_experts": 1}, {"moe_num_experts": 4, "moe_ep_size": 3}, {"moe_ep_size": 2},
                {"moe_num_experts": 4, "moe_capacity_factor": 0}, {"moe_num_experts": 4, "moe_layer_interval": 9},
                {"moe_num_experts": -1}, {"moe_aux_loss_coef": -0.1}):
        with pytest.raises(ConfigError):
            ModelConfig(**bad)
    assert MATConfig(modules=["experts"]).modules == ["experts"]
    for bad in (["heads", "heads"], [], ["layers"], "heads"):
        with pytest.raises(ConfigError, match="mat.modules"):
            MATConfig(modules=bad)


def test_flops_charge_router_and_credit_frozen_expert_tokens():
    dense = FlopsModel(ModelConfig(n_layer=2, d_model=16, d_ff=32), 100, 8)
    moe = FlopsModel(ModelConfig(n_layer=2, d_model=16, d_ff=32, moe_num_experts=4), 100, 8)
    assert moe.matmul_weights - dense.matmul_weights == 16 * 4  # one router (layer 1)
    full = moe.train_step(1000)
    assert full - moe.train_step(1000, frozen_expert_tokens=300) == 2 * 300 * 2 * 16 * 32


def test_moe_with_zero3_is_a_one_line_error_from_the_launcher(tmp_path):
    cfg = config_template("switch_mat_ep1.json")
    cfg["zero_optimization"] = {"stage": 3}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(cfg))
    proc = run_deepspeed("launch/pretrain.py", ["--deepspeed_config", str(path), "--out_dir", str(tmp_path / "run"),
                                                "--cache_dir", str(tmp_path / "cache"), *FAST, "--train_steps", "2"],
                         num_gpus=1, check=False)
    assert proc.returncode != 0
    errors = [line for line in proc.stdout.splitlines() if line.startswith("error: ")]
    assert errors and "ZeRO stage 3" in errors[0] and "stage 2" in errors[0], proc.stdout[-3000:]
