"""MAT through Hugging Face ``transformers.Trainer`` (``mat_ds.hf_trainer.MATTrainer``), run as users run it:
``deepspeed --num_gpus 2 examples/hf_trainer_lm.py ...`` (ZeRO-2, examples/ds_config_hf_trainer.json: warm-up 10,
refresh every 5, alpha 0.3, 16 probe samples = micro batch 8 x 2 ranks at step 0).

One 20-step run with gradient_accumulation_steps=2, a checkpoint at step 10 and W&B offline is shared by the tests of
this module; the resume test adds one launch (from its checkpoint-10 to step 20). The rules (no DeepSpeed, mismatched
gradient accumulation) and the conversion at ``MATTrainer(...)`` are checked in process (one rank, no launch).
"""
from __future__ import annotations

import json
import struct
from types import SimpleNamespace

import pytest

from mat_ds.core.config import ConfigError
from tests.launcher import REPO, run_deepspeed, tagged_json

EXAMPLE = REPO / "examples" / "hf_trainer_lm.py"
DS_CONFIG = REPO / "examples" / "ds_config_hf_trainer.json"
STEPS, SAVE, GA, TIMEOUT = 20, 10, 2, 420
WARMUP, REFRESH, UNITS = 10, 5, 2 * 4  # the JSON's "mat" block; the example's BERT has 2 layers x 4 heads
REFRESH_ENTRIES = [s + 1 for s in range(0, STEPS, REFRESH)]  # refresh at engine step s -> log entry "step": s+1
TIMING = ("mat/refresh_seconds", "mat/refresh_seconds_total")


def example_args(out, cache, *extra) -> list[str]:
    return ["--output_dir", str(out), "--max_steps", str(STEPS), "--save_steps", str(SAVE),
            "--gradient_accumulation_steps", str(GA), "--cache_dir", str(cache), *extra]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """(stdout, output dir, cache dir) of the uninterrupted 20-step run (W&B offline, files in the output dir)."""
    cache = tmp_path_factory.mktemp("hf_trainer_cache")
    out = tmp_path_factory.mktemp("hf_trainer") / "full"
    res = run_deepspeed(EXAMPLE, example_args(out, cache), num_gpus=2, timeout=TIMEOUT,
                        env={"WANDB_MODE": "offline", "WANDB_DIR": str(out)})
    return res.stdout, out, cache


def train_entries(out) -> dict[int, dict]:
    return {e["step"]: e for e in json.loads((out / "log_history.json").read_text()) if "loss" in e}


def wandb_history(out) -> list[dict]:
    """History rows of the offline W&B run: its ``.wandb`` file is W&B's LevelDB-style record log (7-byte file header
    ':W&B' + magic 0xBEE1 + version; 32 KiB blocks of chunks with a 7-byte header crc32/length/type, FULL=1 FIRST=2
    MIDDLE=3 LAST=4) of ``wandb_internal_pb2.Record`` protobufs. wandb 0.31 has no Python reader any more."""
    from wandb.proto import wandb_internal_pb2 as pb

    files = sorted(out.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    data = files[0].read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1)
    rows, pos, buf = [], 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # block trailer padding
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


# -- the rules, in process (no launch) ----------------------------------------------------------------------------------
def test_rules_one_line_errors():
    from mat_ds.hf_trainer import check_trainer_args

    args = SimpleNamespace(gradient_accumulation_steps=2)
    with pytest.raises(ConfigError, match="deepspeed=") as exc:
        check_trainer_args(args, None)  # not a DeepSpeed run
    assert "\n" not in str(exc.value)
    with pytest.raises(ConfigError, match=r"gradient_accumulation_steps=1 but .*=2.*\"auto\"") as exc:
        check_trainer_args(args, {"gradient_accumulation_steps": 1, "mat": {}})
    assert "\n" not in str(exc.value)
    assert check_trainer_args(args, {"gradient_accumulation_steps": "auto", "mat": {}}).policy == "mat"
    assert check_trainer_args(args, {"gradient_accumulation_steps": 2, "mat": {}}) is not None
    assert check_trainer_args(args, {"zero_optimization": {"stage": 2}}) is None  # no "mat" block: plain Trainer
    assert check_trainer_args(args, {"mat": {"enabled": False}}) is None
    with pytest.raises(ConfigError, match="mat.alpha"):
        check_trainer_args(args, {"mat": {"alpha": 2}})


def _tiny_bert():
    from transformers import BertConfig, BertForMaskedLM

    return BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=32, max_position_embeddings=16))


def _args(tmp_path, **kw):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, **kw)  # 1 process, no launch


def test_mat_trainer_without_deepspeed_is_an_error(tmp_path):
    from mat_ds.hf_trainer import MATTrainer

    with pytest.raises(ConfigError, match="MATTrainer runs MAT inside the DeepSpeed engine"):
        MATTrainer(model=_tiny_bert(), args=_args(tmp_path))


def test_mat_trainer_converts_at_construction(tmp_path):
    """The model is head-wise before the Trainer collects optimizer parameters; HF's no-decay rule covers the per-head
    biases b{u}; a JSON whose gradient accumulation contradicts TrainingArguments fails in one line at the user's
    MATTrainer(...) call (before HF's multi-line mismatch report at train())."""
    from mat_ds.core.headwise import HeadwiseLinear
    from mat_ds.hf_trainer import MATTrainer

    cfg = json.loads(DS_CONFIG.read_text())
    trainer = MATTrainer(model=_tiny_bert(), args=_args(tmp_path, deepspeed=cfg, gradient_accumulation_steps=GA))
    assert trainer.is_deepspeed_enabled and trainer.mat is None  # the engine (and engine.mat) come with train()
    attn = trainer.model.bert.encoder.layer[0].attention
    assert isinstance(attn.self.query, HeadwiseLinear) and isinstance(attn.output.dense, HeadwiseLinear)
    decay = set(trainer.get_decay_parameter_names(trainer.model))
    assert "bert.encoder.layer.0.attention.self.query.w1" in decay
    assert not {n for n in decay if n.endswith((".b0", ".b1", "bias"))}, sorted(decay)

    cfg["gradient_accumulation_steps"] = 1
    with pytest.raises(ConfigError, match=r"DeepSpeed gradient_accumulation_steps=1 but TrainingArguments\."
                                          r"gradient_accumulation_steps=2") as exc:
        MATTrainer(model=_tiny_bert(), args=_args(tmp_path, deepspeed=cfg, gradient_accumulation_steps=GA))
    assert "\n" not in str(exc.value)


# -- the shared 20-step run ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_mat_metrics_in_log_history(full_run):
    _, out, _ = full_run
    entries = train_entries(out)
    assert sorted(entries) == list(range(1, STEPS + 1))
    for step, e in entries.items():
        assert {"mat/active_fraction", "mat/frozen_params", "mat/refresh_seconds_total"} <= set(e), e
        lam = [k for k in e if k.startswith("mat/lambda_max/")]
        # λmax of every head once per refresh, in the entry of the step the decision was applied to
        assert len(lam) == (UNITS if step in REFRESH_ENTRIES else 0), (step, lam)
        if step <= WARMUP:
            assert e["mat/active_fraction"] == 1.0 and e["mat/frozen_params"] == 0, e
        else:  # alpha=0.3: the smallest-λmax head is below the modular threshold at every refresh after warm-up
            assert e["mat/active_fraction"] < 1.0 and e["mat/frozen_params"] > 0, e
    losses = [entries[s]["loss"] for s in sorted(entries)]
    assert sum(losses[-5:]) < sum(losses[:5]), losses
    assert losses[0] == pytest.approx(6.93, abs=0.3)  # ln(1024): the loss is a per-token mean (not x GA, not x world)


@pytest.mark.slow
def test_mat_metrics_reach_wandb(full_run):
    _, out, _ = full_run
    rows = [r for r in wandb_history(out) if "train/loss" in r]
    assert len(rows) == STEPS
    assert all("train/mat/active_fraction" in r and "train/mat/frozen_params" in r for r in rows)
    entries = train_entries(out)
    for r in rows:
        step = r["train/global_step"]
        assert r["train/mat/active_fraction"] == entries[step]["mat/active_fraction"]
        assert ("train/mat/lambda_max/L0H0" in r) == (step in REFRESH_ENTRIES), r


@pytest.mark.slow
def test_frozen_heads_do_not_move(full_run):
    """The example's callback compares, after every optimizer step, the weights of every head frozen during it with a
    snapshot taken after the previous step (all ranks; max |ΔW| per logging window)."""
    _, out, _ = full_run
    entries = train_entries(out)
    checked = [s for s, e in entries.items() if e["mat/frozen_units_checked"] > 0]
    # frozen from step 11 on, compared from step 12 on (a refresh may free every head of the previous frozen set)
    assert min(checked) == WARMUP + 2, checked
    assert set(range(WARMUP + 2, STEPS + 1)) - set(REFRESH_ENTRIES) <= set(checked), checked
    assert all(entries[s]["mat/frozen_max_abs_change"] == 0.0 for s in entries), entries


@pytest.mark.slow
def test_gradient_accumulation_refreshes_only_at_boundaries(full_run):
    """With gradient_accumulation_steps=2 the Trainer runs 2 engine forwards per optimizer step; MAT refreshed only in
    the FIRST forward of optimizer steps 0, 5, 10, 15 (never inside an accumulation window)."""
    stdout, _, _ = full_run
    (summary,) = tagged_json(stdout, "MAT_SUMMARY")
    assert summary["gradient_accumulation_steps"] == GA and summary["forwards"] == GA * STEPS
    assert summary["global_step"] == summary["engine_steps"] == STEPS
    assert summary["refreshes"] == [{"forward": GA * s, "engine_step": s} for s in range(0, STEPS, REFRESH)]


@pytest.mark.slow
def test_resume_from_checkpoint_is_exact(full_run, tmp_path):
    """trainer.train(resume_from_checkpoint=checkpoint-10): the checkpoint holds MAT's state; steps 11..20 give the
    same losses, frozen sets and λmax as the uninterrupted run."""
    import torch

    stdout, out, cache = full_run
    ckpt = out / f"checkpoint-{SAVE}"
    state = torch.load(ckpt / f"global_step{SAVE}" / "mp_rank_00_model_states.pt", map_location="cpu",
                       weights_only=False)
    assert state["mat"]["probe"]["batch"]["input_ids"].shape[0] == 16 and "heads" in state["mat"]["policies"]
    res = run_deepspeed(EXAMPLE, example_args(tmp_path / "resumed", cache, "--resume_from_checkpoint", str(ckpt),
                                              "--report_to", "none"), num_gpus=2, timeout=TIMEOUT)
    full, resumed = train_entries(out), train_entries(tmp_path / "resumed")
    assert sorted(resumed) == list(range(1, STEPS + 1))  # 1..10 from the checkpoint's trainer_state.json
    for step in range(SAVE + 1, STEPS + 1):
        a, b = full[step], resumed[step]
        assert b["loss"] == a["loss"], (step, a["loss"], b["loss"])
        mat_a = {k: v for k, v in a.items() if k.startswith("mat/") and k not in TIMING + ("mat/frozen_units_checked",)}
        mat_b = {k: v for k, v in b.items() if k.startswith("mat/") and k not in TIMING + ("mat/frozen_units_checked",)}
        assert mat_b == mat_a, step
    (s_full,), (s_res,) = tagged_json(stdout, "MAT_SUMMARY"), tagged_json(res.stdout, "MAT_SUMMARY")
    assert s_res["frozen"] == s_full["frozen"]
    assert [r["engine_step"] for r in s_res["refreshes"]] == [10, 15]


@pytest.mark.slow
def test_mixtral_experts_through_trainer(tmp_path):
    """A tiny Mixtral (fused experts converted per expert, top-2 routing) through MATTrainer on 2 ranks, ZeRO-2: head
    (KV group) and expert λmax in the log history, units frozen after warm-up with drift exactly 0, loss falls."""
    out = tmp_path / "mixtral"
    run_deepspeed(EXAMPLE, ["--model", "mixtral", *example_args(out, tmp_path / "cache"), "--report_to", "none"],
                  num_gpus=2, timeout=TIMEOUT)
    entries = train_entries(out)
    steps = sorted(entries)
    lam_e = [s for s in steps if any(k.startswith("mat/expert_lambda_max/") for k in entries[s])]
    lam_h = [s for s in steps if any(k.startswith("mat/lambda_max/") for k in entries[s])]
    assert lam_e and lam_e == lam_h
    assert len([k for k in entries[lam_e[0]] if k.startswith("mat/expert_lambda_max/")]) == 2 * 4  # layers x experts
    assert min(entries[s]["mat/active_fraction"] for s in steps) < 1.0 or \
        min(entries[s]["mat/active_expert_fraction"] for s in steps) < 1.0
    checked = [entries[s] for s in steps if entries[s].get("mat/frozen_units_checked", 0) > 0]
    assert checked and all(e["mat/frozen_max_abs_change"] == 0.0 for e in checked)
    assert entries[steps[-1]]["loss"] < entries[steps[0]]["loss"]
