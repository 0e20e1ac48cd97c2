"""The project's trainer on a Hugging Face model from disk (``--model hf:PATH``), through mat_ds.initialize."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mat_ds.tracking import read_metrics
from tests.launcher import REPO, deepspeed_env, run_deepspeed, config_template


def test_missing_model_directory_is_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mat_ds.pretrain", "--deepspeed_config",
                           str(REPO / "configs" / "bert_mat_zero2.json"), "--model", f"hf:{tmp_path / 'nope'}"],
                          cwd=REPO, env=deepspeed_env(), capture_output=True, text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "config.json" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_hf_model_from_config_trains_with_mat(tmp_path, family):
    import transformers as tf

    model_dir = tmp_path / family
    if family == "bert":
        tf.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                      max_position_embeddings=64, architectures=["BertForMaskedLM"]).save_pretrained(model_dir)
    else:
        tf.LlamaConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=128, max_position_embeddings=64,
                       architectures=["LlamaForCausalLM"]).save_pretrained(model_dir)
    cfg = config_template("bert_mat_zero2.json")
    cfg["mat"].update(warmup_steps=10, refresh_interval=5, alpha=0.3, probe_samples=8)
    cfg["scheduler"]["params"]["warmup_num_steps"] = 5
    (tmp_path / "ds.json").write_text(json.dumps(cfg))
    out = tmp_path / "run"
    run_deepspeed(REPO / "launch" / "pretrain.py",
                  ["--deepspeed_config", str(tmp_path / "ds.json"), "--model", f"hf:{model_dir}", "--out_dir", str(out),
                   "--cache_dir", str(tmp_path / "cache"), "--train_steps", "20", "--eval_interval", "0",
                   "--seq_len", "64", "--vocab_size", "1024", "--verify_frozen", "--comm_stats",
                   "--wandb_mode", "disabled"], num_gpus=2, timeout=600)
    rows = read_metrics(str(out / "metrics.jsonl"))
    units = 8 if family == "bert" else 4  # LLaMA GQA: a unit is a KV group (2 layers x 2)
    lam = [r for r in rows if any(k.startswith("mat/lambda_max/") for k in r)]
    assert len(lam) == 4 and all(sum(k.startswith("mat/lambda_max/") for k in r) == units for r in lam)
    frozen = [r for r in rows if r["mat/active_fraction"] < 1.0]
    assert frozen and all(r["mat/frozen_max_abs_change"] == 0.0 for r in frozen)
    base = rows[0]["perf/grad_comm_bytes"]  # nothing frozen at step 1 (warm-up)
    assert all(base - r["perf/grad_comm_bytes"] == 4 * r["mat/frozen_params"] for r in rows)
    assert sum(r["train/loss"] for r in rows[-5:]) < sum(r["train/loss"] for r in rows[:5])


@pytest.mark.slow
def test_trainer_under_autotp_matches_tp1(tmp_path):
    # The trainer shards data over the data-parallel replicas (its Topology), not the world: the two TP ranks of
    # a TP 2 x DP 1 run read the same batches (DeepSpeed's AutoTP checks it at the first forward), so the run is the
    # 1-rank TP 1 run, sharded: same losses, same λ table, frozen units unchanged.
    import transformers as tf

    model_dir = tmp_path / "llama"
    tf.LlamaConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=128, max_position_embeddings=64,
                   architectures=["LlamaForCausalLM"]).save_pretrained(model_dir)
    runs = {}
    for tp in (1, 2):
        cfg = config_template("bert_mat_zero2.json")
        cfg["mat"].update(warmup_steps=10, refresh_interval=5, alpha=0.3, probe_samples=8)
        cfg["scheduler"]["params"]["warmup_num_steps"] = 5
        cfg["zero_optimization"] = {"stage": 1}
        if tp > 1:
            cfg["tensor_parallel"] = {"autotp_size": tp}
        (tmp_path / f"ds{tp}.json").write_text(json.dumps(cfg))
        out = tmp_path / f"run{tp}"
        run_deepspeed(REPO / "launch" / "pretrain.py",
                      ["--deepspeed_config", str(tmp_path / f"ds{tp}.json"), "--model", f"hf:{model_dir}",
                       "--out_dir", str(out), "--cache_dir", str(tmp_path / "cache"), "--train_steps", "16",
                       "--eval_interval", "8", "--seq_len", "64", "--vocab_size", "1024", "--verify_frozen",
                       "--wandb_mode", "disabled"], num_gpus=tp, timeout=600)
        runs[tp] = read_metrics(str(out / "metrics.jsonl"))
    one, two = runs[1], runs[2]
    assert len(one) == len(two) == 16
    assert max(abs(a["train/loss"] - b["train/loss"]) for a, b in zip(one, two)) < 1e-4
    lam = [(a, b) for a, b in zip(one, two) if any(k.startswith("mat/lambda_max/") for k in a)]
    assert lam and all(sorted(k for k in a if k.startswith("mat/lambda_max/")) ==
                       sorted(k for k in b if k.startswith("mat/lambda_max/")) for a, b in lam)
    for a, b in lam:
        for k in (k for k in a if k.startswith("mat/lambda_max/")):
            assert abs(a[k] - b[k]) <= 1e-4 * max(abs(a[k]), 1e-12), (k, a[k], b[k])
    frozen = [r for r in two if r["mat/active_fraction"] < 1.0]
    assert frozen and all(r["mat/frozen_max_abs_change"] == 0.0 for r in frozen)
    assert [r["mat/active_fraction"] for r in one] == [r["mat/active_fraction"] for r in two]
