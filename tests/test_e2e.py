"""End-to-end runs of launch/pretrain.py through the real ``deepspeed`` launcher on CPU ranks (gloo).

Default suite: one MAT run on 2 ranks (ZeRO-2) checked against the acceptance criteria, a GPT run, the single-rank vs
multi-rank equivalence, and bad-input handling. ``-m slow``: ZeRO-0/2/3 agreement and kill-and-resume.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import time
from pathlib import Path

import pytest

from mat_ds.tracking import read_metrics
from tests.launcher import REPO, deepspeed_command, deepspeed_env, kill_group, run_deepspeed, config_template

SCRIPT = "launch/pretrain.py"
FAST = ["--n_layer", "3", "--n_head", "4", "--d_model", "64", "--seq_len", "64", "--vocab_size", "1024",
        "--eval_batches", "4", "--log_interval", "10", "--wandb_mode", "offline"]


def write_config(tmp_path: Path, name: str = "ds.json", stage: int = 2, micro: int = 8, accum: int = 1,
                 **mat) -> str:
    cfg = config_template("bert_mat_zero2.json")
    cfg["zero_optimization"] = {"stage": stage}
    cfg["train_micro_batch_size_per_gpu"] = micro
    cfg["gradient_accumulation_steps"] = accum
    cfg["mat"].update(mat)
    path = tmp_path / name
    path.write_text(json.dumps(cfg))
    return str(path)


def train(tmp_path: Path, config: str, out: str, *extra: str, num_gpus: int = 2, check: bool = True, **kw):
    args = ["--deepspeed_config", config, "--out_dir", str(tmp_path / out), "--cache_dir", str(tmp_path / "cache"),
            *FAST, *extra]
    return run_deepspeed(SCRIPT, args, num_gpus=num_gpus, check=check, **kw)


def metrics(tmp_path: Path, out: str) -> list[dict]:
    return read_metrics(str(tmp_path / out / "metrics.jsonl"))


def lambdas(rows: list[dict]) -> dict[int, list[float]]:
    """step -> λmax per head (in head order) at every refresh."""
    out = {}
    for r in rows:
        keys = sorted((k for k in r if k.startswith("mat/lambda_max/L")),
                      key=lambda k: tuple(int(x) for x in k.split("/")[-1][1:].split("H")))
        if keys:
            out[r["trainer/step"] - 1] = [r[k] for k in keys]  # logged with the step that followed the refresh
    return out


# ----------------------------------------------------------------------------------------------------------------------
def test_mat_zero2_two_ranks_acceptance(tmp_path):
    """Loss falls, λmax per head is logged, heads freeze after warm-up, frozen heads change by exactly 0."""
    cfg = write_config(tmp_path, warmup_steps=20, refresh_interval=10, alpha=0.3, beta=0.05, log_heatmap_interval=20)
    proc = train(tmp_path, cfg, "mat", "--train_steps", "60", "--eval_interval", "30", "--verify_frozen")
    rows = metrics(tmp_path, "mat")
    assert [r["trainer/step"] for r in rows] == list(range(1, 61))
    losses = [r["train/loss"] for r in rows]
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.5, losses
    lam = lambdas(rows)
    assert sorted(lam) == [0, 10, 20, 30, 40, 50] and all(len(v) == 12 and min(v) > 0 for v in lam.values())
    active = [r["mat/active_fraction"] for r in rows]
    assert all(a == 1.0 for a in active[:20]) and min(active[20:]) < 1.0
    changes = [r["mat/frozen_max_abs_change"] for r in rows if r["mat/active_fraction"] < 1.0]
    assert changes and all(c == 0.0 for c in changes)
    # MAT's own overhead is accounted: the cumulative refresh time grows at refresh steps only.
    totals = [r["mat/refresh_seconds_total"] for r in rows]
    assert totals == sorted(totals) and totals[0] > 0
    grew = [r["trainer/step"] - 1 for prev, r in zip([{"mat/refresh_seconds_total": 0.0}] + rows, rows)
            if r["mat/refresh_seconds_total"] > prev["mat/refresh_seconds_total"]]
    assert grew == sorted(lam) and all("mat/refresh_seconds" in rows[s] for s in grew)
    assert not any("mat/skipped_layers" in r for r in rows)  # layer skipping is RaPTr's metric only
    assert list((tmp_path / "mat" / "wandb").glob("offline-run-*")), "W&B offline run missing"
    assert "error" not in proc.stdout.lower().replace("error_", "")


def test_mlp_units_two_ranks(tmp_path):
    """"modules": ["heads", "mlp"]: MLP units are measured (λ per L{l}G{g}), frozen by their own threshold, stay
    exactly unchanged while frozen, and every step's FLOPs charge exactly the frozen heads and MLP units."""
    cfg = write_config(tmp_path, warmup_steps=10, refresh_interval=5, alpha=0.3, beta=0.0, modules=["heads", "mlp"],
                       mlp_groups=4, log_heatmap_interval=10)
    train(tmp_path, cfg, "mlp", "--train_steps", "30", "--eval_interval", "0", "--verify_frozen")
    rows = metrics(tmp_path, "mlp")
    refresh = [r for r in rows if "mat/mlp_lambda_max/L0G0" in r]
    assert [r["trainer/step"] - 1 for r in refresh] == [0, 5, 10, 15, 20, 25]
    names = {k.rpartition("/")[2] for r in refresh for k in r if k.startswith("mat/mlp_lambda_max/")}
    assert names == {f"L{l}G{g}" for l in range(3) for g in range(4)}  # FAST: 3 layers, 4 groups each
    frac = [r["mat/active_mlp_fraction"] for r in rows]
    assert all(f == 1.0 for f in frac[:10]) and min(frac[10:]) < 1.0
    assert all(r["mat/frozen_max_abs_change"] == 0.0 for r in rows if r["mat/active_mlp_fraction"] < 1.0)
    # FLOPs: the cumulative training FLOPs grow by exactly FlopsModel's step cost for the logged frozen counts
    from mat_ds.config import ModelConfig
    from mat_ds.models.flops import FlopsModel

    f = FlopsModel.for_run(ModelConfig(n_layer=3, n_head=4, d_model=64), 1024, 64, 0.15)
    tokens = 8 * 2 * 64
    prev = 0.0
    for r in rows:
        heads = 12 - round(r["mat/active_fraction"] * 12)
        mlp = 12 - r["mat/active_mlp"]
        assert r["perf/train_flops_cumulative"] - prev == f.train_step(tokens, heads, 0, 0, mlp, 4), r["trainer/step"]
        prev = r["perf/train_flops_cumulative"]
    assert rows[-1]["train/loss"] < rows[0]["train/loss"]


def test_gpt_two_ranks(tmp_path):
    cfg = write_config(tmp_path, warmup_steps=10, refresh_interval=5, alpha=0.3)
    train(tmp_path, cfg, "gpt", "--arch", "gpt", "--train_steps", "20", "--eval_interval", "0")
    rows = metrics(tmp_path, "gpt")
    assert rows[-1]["train/loss"] < rows[0]["train/loss"] and rows[-1]["mat/active_fraction"] < 1.0


def test_two_ranks_equal_one_rank_with_accumulation(tmp_path):
    """2 ranks x 1 micro-batch == 1 rank x 2 accumulated micro-batches: same samples, same losses, same λmax."""
    common = dict(warmup_steps=10, refresh_interval=10, alpha=0.3)
    two = write_config(tmp_path, "two.json", accum=1, **common)
    one = write_config(tmp_path, "one.json", accum=2, **common)
    steps = ["--train_steps", "25", "--eval_interval", "0", "--dropout", "0.1"]
    train(tmp_path, two, "two", *steps, num_gpus=2)
    train(tmp_path, one, "one", *steps, num_gpus=1)
    a, b = metrics(tmp_path, "two"), metrics(tmp_path, "one")
    for ra, rb in zip(a, b):
        assert abs(ra["train/loss"] - rb["train/loss"]) <= 1e-4 * abs(rb["train/loss"]), (ra, rb)
        assert ra["mat/active_fraction"] == rb["mat/active_fraction"]
    la, lb = lambdas(a), lambdas(b)
    assert sorted(la) == sorted(lb) == [0, 10, 20]
    for s in la:
        assert max(abs(x - y) / y for x, y in zip(la[s], lb[s])) < 1e-4, s


@pytest.mark.parametrize("policy", ["raptr", "multirate"])
def test_baselines_run_under_a_flops_budget(tmp_path, policy):
    """RaPTr skips layers (cheaper steps), Multirate freezes slow heads between k-th steps; both stop at the budget."""
    mat = {"raptr": {"policy": "raptr", "raptr_schedule": [[0, 2], [10, 3]]},
           "multirate": {"policy": "multirate", "multirate_k": 3, "warmup_steps": 3}}[policy]
    cfg = config_template("bert_mat_zero2.json")
    cfg["mat"] = mat
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(cfg))
    budget = 2.0e10
    train(tmp_path, str(path), policy, "--train_steps", "200", "--eval_interval", "0", "--flops_budget", str(budget))
    rows = metrics(tmp_path, policy)
    flops = [r["perf/flops_cumulative"] for r in rows]
    assert flops[-1] >= budget > flops[-2] and len(rows) < 200
    per_step = [b - a for a, b in zip([0.0] + flops, flops)]
    assert "val/loss" in rows[-1] and rows[-1]["train/loss"] < rows[0]["train/loss"]
    if policy == "raptr":
        assert all(r["mat/skipped_layers"] == 1 for r in rows[:10]) and all(r["mat/skipped_layers"] == 0
                                                                          for r in rows[10:])
        assert per_step[0] < per_step[-1]  # 2 of 3 layers cost less than 3 of 3
    else:
        assert not any("mat/skipped_layers" in r for r in rows)
        active = [r["mat/active_fraction"] for r in rows]
        assert active[:3] == [1.0] * 3 and 0.5 in active and active[3] == 1.0  # step 3 % 3 == 0: everyone trains
        assert per_step[4] < per_step[3]


# ----------------------------------------------------------------------------------------------------------------------
def _one_error_line(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert proc.returncode != 0
    lines = [l for l in proc.stdout.splitlines() if l.startswith("error: ")]
    assert lines and needle in lines[0], proc.stdout[-3000:]


def test_bad_mat_config_is_one_line_error(tmp_path):
    cfg = write_config(tmp_path, alpha=1.5)
    _one_error_line(train(tmp_path, cfg, "bad", "--train_steps", "2", check=False, num_gpus=1), "mat.alpha")
    cfg = write_config(tmp_path, "typo.json", alhpa=0.2)
    _one_error_line(train(tmp_path, cfg, "bad", "--train_steps", "2", check=False, num_gpus=1), "unknown key")


def test_bad_data_is_one_line_error(tmp_path):
    cfg = write_config(tmp_path)
    _one_error_line(train(tmp_path, cfg, "x", "--train_data", str(tmp_path / "missing.txt"), check=False),
                    "missing.txt")
    (tmp_path / "empty.txt").write_text("  \n\n")
    _one_error_line(train(tmp_path, cfg, "x", "--train_data", str(tmp_path / "empty.txt"), check=False), "empty.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1") * 50)
    _one_error_line(train(tmp_path, cfg, "x", "--train_data", str(tmp_path / "latin1.txt"), check=False),
                    "latin1.txt")


def _tree_digest(path: Path) -> dict:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def test_corrupt_checkpoint_is_one_line_error_and_nothing_is_lost(tmp_path):
    cfg = write_config(tmp_path, warmup_steps=2, refresh_interval=2)
    train(tmp_path, cfg, "run", "--train_steps", "4", "--save_interval", "2", "--eval_interval", "0")
    ckpt = tmp_path / "run" / "checkpoints"
    states = sorted((ckpt / "global_step4").glob("*model_states.pt"))
    assert states
    states[0].write_bytes(b"this is not a checkpoint")
    before = _tree_digest(ckpt)
    proc = train(tmp_path, cfg, "run", "--train_steps", "6", check=False)
    _one_error_line(proc, "global_step4")
    assert _tree_digest(ckpt) == before


# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_zero_stages_agree_on_lambda_and_frozen_sets(tmp_path):
    """Same seed under ZeRO-0, ZeRO-2 and ZeRO-3: same λmax (rel 1e-4) and frozen sets for the first refreshes."""
    runs = {}
    for stage in (0, 2, 3):
        cfg = write_config(tmp_path, f"z{stage}.json", stage=stage, warmup_steps=10, refresh_interval=10, alpha=0.3)
        train(tmp_path, cfg, f"z{stage}", "--train_steps", "31", "--eval_interval", "0", "--verify_frozen")
        runs[stage] = metrics(tmp_path, f"z{stage}")
    lam = {s: lambdas(rows) for s, rows in runs.items()}
    for stage in (2, 3):
        for step in (0, 10, 20, 30):
            rel = max(abs(x - y) / y for x, y in zip(lam[stage][step], lam[0][step]))
            print(f"ZeRO-{stage} vs ZeRO-0 step {step}: max rel λ diff {rel:.2e}")
            assert rel < 1e-4
        frozen = lambda rows: [r["mat/frozen_heads"] for r in rows if "mat/frozen_heads" in r]  # noqa: E731
        assert frozen(runs[stage]) == frozen(runs[0])
        assert all(r.get("mat/frozen_max_abs_change", 0.0) == 0.0 for r in runs[stage])
    # ZeRO-3 splits the Gram work by owned parameter shard; every stage sends ONE [L, H, n, n] fp32 all-reduce
    for stage, rows in runs.items():
        sent = {r["mat/refresh_comm_bytes"] for r in rows if "mat/refresh_comm_bytes" in r}
        print(f"ZeRO-{stage}: Gram all-reduce per refresh {sent} bytes")
        assert sent == {3 * 4 * 16 * 16 * 4}  # FAST: 3 layers x 4 heads, 16 probe samples


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["dense", "switch_ep2", "mlp"])
def test_kill_after_checkpoint_and_resume_matches_uninterrupted(tmp_path, variant):
    mlp = dict(modules=["heads", "mlp"], mlp_groups=2) if variant == "mlp" else {}
    cfg = write_config(tmp_path, warmup_steps=10, refresh_interval=5, alpha=0.3, **mlp)
    if variant == "switch_ep2":  # Switch MoE, experts split over the 2 ranks: expert checkpoints + expert policy state
        ds = json.loads(Path(cfg).read_text())
        ds["model"] = config_template("switch_mat_ep2.json")["model"]
        Path(cfg).write_text(json.dumps(ds))
    steps = ["--train_steps", "40", "--save_interval", "10", "--eval_interval", "20"]
    train(tmp_path, cfg, "straight", *steps)
    reference = {r["trainer/step"]: r for r in metrics(tmp_path, "straight")}

    # Start the same run, SIGKILL the whole launcher process group once a checkpoint past warm-up exists.
    args = ["--deepspeed_config", cfg, "--out_dir", str(tmp_path / "killed"), "--cache_dir", str(tmp_path / "cache"),
            *FAST, *steps]
    proc = subprocess.Popen(deepspeed_command(SCRIPT, args), cwd=REPO, env=deepspeed_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    latest = tmp_path / "killed" / "checkpoints" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and not (latest.exists() and latest.read_text().strip() == "global_step20"):
        time.sleep(0.2)
    kill_group(proc)
    resumed_from = int(latest.read_text().strip().removeprefix("global_step"))
    assert 20 <= resumed_from < 40

    train(tmp_path, cfg, "killed", *steps)  # the same command again resumes from `latest`
    rows = {r["trainer/step"]: r for r in metrics(tmp_path, "killed")}
    assert sorted(rows) == list(range(1, 41))
    worst = max(abs(rows[s]["train/loss"] - reference[s]["train/loss"]) for s in range(resumed_from + 1, 41))
    print(f"resumed from step {resumed_from}; max |loss diff| over steps {resumed_from + 1}..40 = {worst:.3e}")
    assert worst <= 1e-6
    assert rows[40]["val/loss"] == pytest.approx(reference[40]["val/loss"], abs=1e-6)
    assert rows[40]["mat/active_fraction"] == reference[40]["mat/active_fraction"]
    totals = [rows[s]["mat/refresh_seconds_total"] for s in range(1, 41)]
    assert totals == sorted(totals)  # MAT's refresh-time total rides the checkpoint (not reset by the resume)
    if variant == "switch_ep2":
        assert [rows[s]["mat/active_experts"] for s in range(1, 41)] == \
            [reference[s]["mat/active_experts"] for s in range(1, 41)]
        assert min(rows[s]["mat/active_experts"] for s in range(1, 41)) < 4
    if variant == "mlp":  # the MLP kind's policy state rides the checkpoint too
        assert [rows[s]["mat/active_mlp"] for s in range(1, 41)] == \
            [reference[s]["mat/active_mlp"] for s in range(1, 41)]
        assert min(rows[s]["mat/active_mlp"] for s in range(1, 41)) < 6


def test_patience_stops_when_the_test_loss_stops_improving(tmp_path):
    """Early stopping (the converge benchmark's stop rule): with lr 0 the test loss never beats its first value, so a
    run with --patience 2 stops after the third evaluation instead of running to train_steps."""
    cfg = config_template("bert_mat_zero2.json")
    cfg["mat"] = {"policy": "full"}
    cfg["optimizer"]["params"]["lr"] = 0.0
    cfg["scheduler"] = {"type": "WarmupLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 0.0,
                                                       "warmup_num_steps": 1}}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(cfg))
    train(tmp_path, str(path), "es", "--train_steps", "50", "--eval_interval", "2", "--patience", "2",
          "--test_data", "default", num_gpus=1)
    rows = metrics(tmp_path, "es")
    tests = [r["test/loss"] for r in rows if "test/loss" in r]
    assert max(r["trainer/step"] for r in rows) == 6 and len(tests) == 3
    assert tests[0] == tests[1] == tests[2]  # nothing moved: no new best after the first evaluation

    # --patience_from 8: the evaluations at 2-6 do not count; 8 is the best, 10 and 12 are not better: stop at 12
    train(tmp_path, str(path), "es_from", "--train_steps", "50", "--eval_interval", "2", "--patience", "2",
          "--patience_from", "8", "--test_data", "default", num_gpus=1)
    assert max(r["trainer/step"] for r in metrics(tmp_path, "es_from")) == 12
    # The stopped run continued from its final checkpoint under a later patience_from counts afresh (the restored
    # count would stop it at once, at 6): 8 is ignored (< 10), 10 is the best, 12 and 14 are not: stop at 14
    train(tmp_path, str(path), "es", "--train_steps", "50", "--eval_interval", "2", "--patience", "2",
          "--patience_from", "10", "--test_data", "default", "--resume", "auto", num_gpus=1)
    assert max(r["trainer/step"] for r in metrics(tmp_path, "es")) == 14
