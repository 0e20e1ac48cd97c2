"""Elastic resume through DeepSpeed's universal checkpoint (``mat_ds/universal.py``, ``docs/elastic_resume.md``).

Default suite: the layout decision (which combinations load plainly, through a universal copy, or are refused with one
line), the writer's layout read off DeepSpeed's file names, and ONE run through the real launcher: a MAT run on 2 ranks
(ZeRO-2, heads frozen after warm-up) saved at step 6 and resumed on 1 rank with gradient accumulation 2 (same global
batch, same samples): the trainer converts the tag once, MAT's state after the load equals the saved one, the next
losses equal the uninterrupted 2-rank run's, and the frozen units' weights stay exactly unchanged across the resume.
``-m slow``: the same for ZeRO-1, ZeRO-3 and ZeRO-0 (no conversion), DP 1 -> DP 2, and the refusals through the
launcher.

Tensor parallelism (tests/scripts/tp_check.py --elastic, HF LLaMA-GQA under DeepSpeed AutoTP): default suite TP 2 ->
TP 1 (ZeRO-1, ~30 s); ``-m slow`` ZeRO-2, TP 1 -> TP 2, TP 2 x DP 2 -> TP 2 x DP 1, MLP units, bf16, GPT-NeoX and
Phi-3, the ZeRO-0 refusal, and the trainer itself (``--model hf:``) TP 2 -> TP 1.

A user's own loop (tests/scripts/wrapper_universal_check.py, ``-m slow``): ZeRO-3 DP 2 -> DP 1 through DeepSpeed's
``engine.load_checkpoint`` with ``load_universal``, the stage-3 loader's defects mended by the engine itself.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from mat_ds import checkpoint as ck
from mat_ds import universal as uc
from mat_ds.tracking import read_metrics
from tests.hardware import bf16_supported
from tests.launcher import REPO, run_deepspeed, config_template, tagged_json
from tests.states import same

CHECK = "tests/scripts/universal_check.py"
FAST = ["--n_layer", "3", "--n_head", "4", "--d_model", "64", "--seq_len", "64", "--vocab_size", "1024",
        "--eval_batches", "1", "--eval_interval", "0", "--log_interval", "1", "--wandb_mode", "disabled",
        "--verify_frozen"]
SAVE_AT, FIRST_REFRESH_AFTER, END = 6, 8, 10  # warm-up 4, refresh every 4: decisions at steps 4 and 8


# ----------------------------------------------------------------------------------------------------------------------
# The decision (pure)
# ----------------------------------------------------------------------------------------------------------------------
def L(dp, stage, tp=1, ep=1, world=None, **kw):  # noqa: N802 - a layout literal
    return {"world": world or dp * tp, "dp": dp, "tp": tp, "ep": ep, "zero_stage": stage, **kw}


@pytest.mark.parametrize("src, cur, policy, want", [
    (L(2, 2), L(2, 2), "auto", "plain"),
    (L(2, 2), L(1, 2), "auto", "universal"),
    (L(1, 2), L(2, 2), "auto", "universal"),
    (L(2, 1), L(1, 1), "auto", "universal"),
    (L(2, 1), L(2, 2), "auto", "universal"),  # ZeRO-1 <-> ZeRO-2 share a format; universal is the measured path
    (L(2, 3), L(1, 3), "auto", "universal"),
    (L(2, 0), L(1, 0), "auto", "plain"),  # ZeRO-0: the whole optimizer state is in mp_rank_00
    (L(2, 2), L(2, 2), "always", "universal"),
    (L(2, 2, ep=1, world=2), L(1, 2), "auto", "universal"),  # MoE without expert parallelism converts
    ({"zero_stage": None, "family": "1/2", "dp": 2, "tp": 1}, L(1, 2), "auto", "universal"),  # inferred from files
    ({"zero_stage": 0, "tp": 1}, L(1, 0), "auto", "plain"),  # a ZeRO-0 tag without a recorded layout
    # tensor parallelism (head-wise units under global names, ``tp_units``): TP and DP changes go universal
    (L(1, 1, tp=2, tp_units="global"), L(1, 1), "auto", "universal"),
    (L(1, 2, tp=2, tp_units="global"), L(1, 2), "auto", "universal"),
    (L(1, 1), L(1, 1, tp=2, tp_units="global"), "auto", "universal"),
    (L(2, 1, tp=2, tp_units="global"), L(1, 1, tp=2, tp_units="global"), "auto", "universal"),
    (L(1, 1, tp=2, tp_units="global"), L(1, 1, tp=2, tp_units="global"), "auto", "plain"),
    (L(1, 2, tp=2), L(1, 2, tp=2), "auto", "plain"),  # an older TP save, same layout: DeepSpeed's ordinary load
    (L(2, 0, tp=2, tp_units="global"), L(1, 0, tp=2, tp_units="global"), "auto", "plain"),  # ZeRO-0, same TP
])
def test_decide(src, cur, policy, want):
    assert uc.decide(src, cur, policy, tag_is_universal=False, save_dir="/ck", tag="global_step6") == want


@pytest.mark.parametrize("src, cur, policy, universal, needle", [
    (L(2, 2), L(1, 2), "never", False, "python -m deepspeed.checkpoint.ds_to_universal --inject_missing_state "
                                       "--input_folder /ck/global_step6 --output_folder /ck/global_step6_universal"),
    (L(2, 2, ep=2), L(1, 2), "auto", False, "expert-parallel"),
    (L(2, 2), L(1, 3), "auto", False, "cannot load a ZeRO-1/2 checkpoint into ZeRO-3"),
    (L(2, 3), L(1, 2), "auto", False, "cannot load a ZeRO-3 checkpoint into ZeRO-1/2"),
    (L(2, 0), L(1, 2), "auto", False, "ZeRO-0 checkpoint into ZeRO-1/2"),
    (L(1, 2, tp=2), L(1, 2), "auto", False, "named each TP rank's head-wise units w0.. locally"),
    (L(2, 2, tp=2), L(1, 2, tp=2), "auto", False, "named each TP rank's head-wise units w0.. locally"),
    (L(1, 0, tp=2, tp_units="global"), L(1, 0), "auto", False, "ZeRO-0 can neither make"),
    (L(1, 0), L(1, 0, tp=2, tp_units="global"), "auto", False, "ZeRO-0 can neither make"),
    (L(1, 2, tp=2, tp_units="global"), L(1, 2), "never", False,
     "python -m mat_ds.universal --input_folder /ck/global_step6 --output_folder /ck/global_step6_universal"),
    (L(2, 2), L(1, 0), "always", False, "loads into ZeRO stage 1, 2 or 3 only"),
    ({"zero_stage": None, "family": "1/2", "tp": 1}, L(1, 0), "auto", True, "loads into ZeRO stage 1, 2 or 3 only"),
    ({"zero_stage": None, "family": "1/2", "tp": 1}, L(1, 3), "auto", True, "into ZeRO-3"),
])
def test_refusals_are_one_line(src, cur, policy, universal, needle):
    with pytest.raises(uc.Refusal) as info:
        uc.decide(src, cur, policy, tag_is_universal=universal, save_dir="/ck", tag="global_step6")
    text = str(info.value)
    assert needle in text and "\n" not in text, text
    assert "written at" in text and "this run is" in text


def test_source_layout_from_file_names(tmp_path):
    """Tags written before the manifest recorded a layout: DeepSpeed's file names say stage family, DP and TP."""
    def tag(name, files):
        d = tmp_path / name
        d.mkdir()
        for f in files:
            (d / f).write_bytes(b"")
        return str(d)

    z2 = uc.source_layout(tag("z2", ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                     "zero_pp_rank_1_mp_rank_00_optim_states.pt"]))
    assert (uc.family(z2.get("zero_stage")) or z2["family"], z2["dp"], z2["tp"]) == ("1/2", 2, 1)
    bf16 = uc.source_layout(tag("bf16", ["mp_rank_00_model_states.pt"] +
                                [f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(4)]))
    assert (bf16["family"], bf16["dp"]) == ("1/2", 4)
    z3 = uc.source_layout(tag("z3", [f"zero_pp_rank_{r}_mp_rank_00_{k}_states.pt" for r in range(2)
                                     for k in ("model", "optim")]))
    assert (z3["zero_stage"], z3["dp"]) == (3, 2)
    assert uc.source_layout(tag("z0", ["mp_rank_00_model_states.pt"]))["zero_stage"] == 0
    # a manifest's recorded layout wins
    d = tmp_path / "z2"
    (d / ck.MANIFEST).write_text(json.dumps({"tag": "z2", "layout": L(2, 2), "files": {}}))
    assert uc.source_layout(str(d)) == L(2, 2)


def test_retention_removes_a_tags_universal_copy_with_it(tmp_path):
    for name in ("global_step2", "global_step2_universal", "global_step4", "global_step4_universal", "global_step6",
                 ".universal.global_step4.123", "my_tag_universal"):
        (tmp_path / name).mkdir()
    removed = ck.apply_retention(str(tmp_path), keep=2, protect=["global_step6"])
    assert removed == ["global_step2", "global_step2_universal"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step4", "global_step4_universal", "global_step6",
                                                         "my_tag_universal"]


# ----------------------------------------------------------------------------------------------------------------------
# Through the launcher
# ----------------------------------------------------------------------------------------------------------------------
def write_config(tmp_path: Path, name: str, stage: int, accum: int, **extra) -> str:
    cfg = config_template("bert_mat_zero2.json")
    cfg["zero_optimization"] = {"stage": stage}
    cfg["train_micro_batch_size_per_gpu"] = 8
    cfg["gradient_accumulation_steps"] = accum
    cfg["mat"].update(warmup_steps=4, refresh_interval=4, alpha=0.3, beta=0.05)
    cfg.update(extra)
    path = tmp_path / name
    path.write_text(json.dumps(cfg))
    return str(path)


def launch(tmp_path: Path, config: str, out: str, num_gpus: int, *extra: str, dump: Path | None = None,
           check: bool = True, script: str = CHECK):
    args = ["--deepspeed_config", config, "--out_dir", str(tmp_path / out), "--cache_dir", str(tmp_path / "cache"),
            *FAST, *extra]
    env = {"MAT_DS_UNIVERSAL_DUMP": str(dump)} if dump else None
    return run_deepspeed(script, args, num_gpus=num_gpus, timeout=600, env=env, check=check)


def client_state(tag_dir: Path) -> dict:
    files = sorted(tag_dir.glob("mp_rank_00_model_states.pt"))
    files = files or sorted(tag_dir.glob("zero_pp_rank_0_*model_states.pt"))
    return torch.load(files[0], map_location="cpu", weights_only=False)


def full_weights(tag_dir: Path) -> dict[str, torch.Tensor]:
    """Every parameter's value in a tag (ZeRO-3: from the fp32 partitions, as DeepSpeed's zero_to_fp32 does)."""
    sd = client_state(tag_dir)
    if sd.get("module") and all(v.numel() for v in sd["module"].values()):
        return {k: v.float() for k, v in sd["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    full = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    return {k: v.detach().float() for k, v in full.items()}


def tree_digest(path: Path) -> dict:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def elastic_resume(tmp_path: Path, stage: int, src_dp: int, dst_dp: int) -> dict:
    """Uninterrupted run on ``src_dp`` ranks to END (saving at SAVE_AT); the SAVE_AT tag copied into a fresh run
    directory and resumed there on ``dst_dp`` ranks (accumulation chosen for the same global batch) with the same
    command; checks and returns the acceptance figures."""
    src_cfg = write_config(tmp_path, "src.json", stage, accum=2 // src_dp)
    dst_cfg = write_config(tmp_path, "dst.json", stage, accum=2 // dst_dp)
    launch(tmp_path, src_cfg, "straight", src_dp, "--train_steps", str(END), "--save_interval", str(SAVE_AT))
    tag = ck.tag_for(SAVE_AT)
    source = tmp_path / "straight" / "checkpoints" / tag
    resumed_ckpt = tmp_path / "resumed" / "checkpoints"
    resumed_ckpt.mkdir(parents=True)
    shutil.copytree(source, resumed_ckpt / tag)
    (resumed_ckpt / "latest").write_text(tag)
    before = tree_digest(resumed_ckpt / tag)

    dump = tmp_path / "after_load.pt"
    proc = launch(tmp_path, dst_cfg, "resumed", dst_dp, "--train_steps", str(END),
                  "--save_interval", str(FIRST_REFRESH_AFTER - SAVE_AT), dump=dump)
    converted = (resumed_ckpt / uc.universal_tag(tag)).is_dir()
    if stage == 0:
        assert not converted and "holds the whole optimizer state" in proc.stdout, proc.stdout[-3000:]
    else:
        assert converted and f"converting it now into {uc.universal_tag(tag)}" in proc.stdout, proc.stdout[-3000:]
        manifest = json.loads((resumed_ckpt / uc.universal_tag(tag) / ck.MANIFEST).read_text())
        assert manifest["universal_of"] == tag and manifest["layout"]["dp"] == src_dp
        assert ck.verify_tag(str(resumed_ckpt), uc.universal_tag(tag)) is None
        assert not list(resumed_ckpt.glob(uc.STAGING + "*")) and not (resumed_ckpt / "latest_universal").exists()
    assert tree_digest(resumed_ckpt / tag) == before  # the source tag is read, never written

    # 1. MAT's state after the load == the state the DP-src run saved (policy history, frozen sets, probe set, ...)
    saved = client_state(source)
    after = torch.load(dump, map_location="cpu", weights_only=False)
    assert after["world"] == dst_dp and after["step"] == SAVE_AT
    diff = same(saved["mat"], after["mat"])
    assert not diff, diff[:10]
    assert any(saved["mat"]["policies"]["heads"]["frozen"]), "no head frozen at the save: the test proves nothing"

    # 2. every weight came through the conversion bit for bit; frozen units stay exactly unchanged over the resumed
    #    run's steps SAVE_AT..FIRST_REFRESH_AFTER (the saved decision holds until the refresh at FIRST_REFRESH_AFTER)
    w_saved = full_weights(source)
    assert not [n for n in w_saved if not torch.equal(w_saved[n], after["weights"][n].float())]
    w_later = full_weights(resumed_ckpt / ck.tag_for(FIRST_REFRESH_AFTER))
    frozen = sorted({n for unit in after["frozen"] for n in unit})
    drift = max(float((w_later[n] - w_saved[n]).abs().max()) for n in frozen)
    trained = [n for n in w_saved if n not in frozen and n.endswith(("qkv.w0", "qkv.w1", "qkv.w2", "qkv.w3"))]
    assert frozen and drift == 0.0, drift
    assert all(not torch.equal(w_later[n], w_saved[n]) for n in trained)  # the others did train

    # 3. the next losses equal the uninterrupted run's; the same refresh decisions after the resume
    dloss, lam_err = resumed_matches_uninterrupted(tmp_path)
    assert lam_err <= 1e-5, lam_err
    end_state = [client_state(d / ck.tag_for(END))["mat"]["policies"] for d in
                 (tmp_path / "straight" / "checkpoints", resumed_ckpt)]
    assert [p["frozen"] for p in end_state[0].values()] == [p["frozen"] for p in end_state[1].values()]
    print(f"ZeRO-{stage} DP {src_dp} -> DP {dst_dp}: max |dloss| over steps {SAVE_AT + 1}..{END} = {dloss:.3e}; "
          f"MAT state equal; {len(frozen)} frozen parameters, max drift {drift}")
    return {"dloss": dloss, "drift": drift}


def resumed_matches_uninterrupted(tmp_path: Path) -> tuple[float, float]:
    """The trainer's logs of ``resumed`` (steps SAVE_AT+1..END) against ``straight``'s: losses within 1e-5, the same
    active fractions, frozen units unchanged at every step. Returns (max |Δloss|, the largest relative λmax error
    at the first refresh after the resume)."""
    ref = {r["trainer/step"]: r for r in read_metrics(str(tmp_path / "straight" / "metrics.jsonl"))}
    got = {r["trainer/step"]: r for r in read_metrics(str(tmp_path / "resumed" / "metrics.jsonl"))}
    assert sorted(got) == list(range(SAVE_AT + 1, END + 1))
    dloss = max(abs(got[s]["train/loss"] - ref[s]["train/loss"]) for s in got)
    assert dloss <= 1e-5, dloss
    assert [got[s]["mat/active_fraction"] for s in got] == [ref[s]["mat/active_fraction"] for s in got]
    assert all(r.get("mat/frozen_max_abs_change", 0.0) == 0.0 for r in got.values())
    after = FIRST_REFRESH_AFTER + 1
    lam = [k for k in ref[after] if k.startswith("mat/lambda_max/")]
    assert lam, "no λmax logged at the first refresh after the resume"
    return dloss, max(abs(got[after][k] - ref[after][k]) / max(abs(ref[after][k]), 1e-30) for k in lam)


def test_dp2_zero2_resumes_at_dp1(tmp_path):
    elastic_resume(tmp_path, stage=2, src_dp=2, dst_dp=1)


@pytest.mark.slow
@pytest.mark.parametrize("stage, src_dp, dst_dp", [(1, 2, 1), (3, 2, 1), (0, 2, 1), (2, 1, 2)])
def test_elastic_resume_variants(tmp_path, stage, src_dp, dst_dp):
    elastic_resume(tmp_path, stage, src_dp, dst_dp)


def _one_error_line(proc, *needles: str) -> str:
    assert proc.returncode != 0
    lines = [l for l in proc.stdout.splitlines() if l.startswith("error: ")]
    assert len(lines) == 1 and all(n in lines[0] for n in needles), proc.stdout[-3000:]
    assert "Traceback" not in proc.stdout, proc.stdout[-3000:]
    return lines[0]


@pytest.mark.slow
def test_refusals_through_the_launcher(tmp_path):
    """--universal never, a ZeRO-2 tag into ZeRO-3, and expert parallelism: one line each, nothing on disk changed;
    then the copy the refusal's command makes loads with --resume TAG_universal."""
    launch(tmp_path, write_config(tmp_path, "z2.json", 2, 1), "z2", 2, "--train_steps", "2", "--save_interval", "2")
    ckpt = tmp_path / "z2" / "checkpoints"
    before = tree_digest(ckpt)
    line = _one_error_line(launch(tmp_path, write_config(tmp_path, "z2_1.json", 2, 2), "z2", 1, "--train_steps", "4",
                                  "--universal", "never", check=False),
                           "--universal never", "ds_to_universal --inject_missing_state --input_folder")
    print(line)
    _one_error_line(launch(tmp_path, write_config(tmp_path, "z3_1.json", 3, 2), "z2", 1, "--train_steps", "4",
                           check=False), "into ZeRO-3")
    assert tree_digest(ckpt) == before
    # A copy made by hand, the DeepSpeed way (the command the refusal gave), loads with --resume TAG_universal
    import subprocess
    import sys

    subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--inject_missing_state",
                    "--input_folder", str(ckpt / "global_step2"),
                    "--output_folder", str(ckpt / "global_step2_universal"),
                    "--num_extract_workers", "1", "--num_merge_workers", "1"], check=True, capture_output=True)
    proc = launch(tmp_path, write_config(tmp_path, "z2_1.json", 2, 2), "z2", 1, "--train_steps", "4",
                  "--resume", "global_step2_universal", "--universal", "never")
    assert "loading universal checkpoint global_step2_universal at DP 1 ZeRO-2" in proc.stdout, proc.stdout[-3000:]
    assert [r["trainer/step"] for r in read_metrics(str(tmp_path / "z2" / "metrics.jsonl"))][-2:] == [3, 4]

    switch = config_template("switch_mat_ep2.json")["model"]
    launch(tmp_path, write_config(tmp_path, "ep2.json", 2, 1, model=switch), "ep2", 2, "--train_steps", "2",
           "--save_interval", "2")
    before = tree_digest(tmp_path / "ep2" / "checkpoints")
    one = write_config(tmp_path, "ep1.json", 2, 2, model={**switch, "moe_ep_size": 1})
    _one_error_line(launch(tmp_path, one, "ep2", 1, "--train_steps", "4", check=False), "expert-parallel")
    assert tree_digest(tmp_path / "ep2" / "checkpoints") == before


# ----------------------------------------------------------------------------------------------------------------------
# Tensor parallelism (tests/scripts/tp_check.py --elastic): HF LLaMA-GQA through mat_ds.initialize, saved with
# mat_ds.checkpoint.save at one (TP, DP), resumed with mat_ds.checkpoint.load(universal="auto") at another
# ----------------------------------------------------------------------------------------------------------------------
TP_CHECK = "tests/scripts/tp_check.py"


def tp_elastic(tmp_path: Path, stage: int, save: tuple, resume: tuple, mlp: bool = False, bf16: bool = False,
               family: str = "llama") -> dict:
    """``save`` / ``resume`` = (ranks, TP size). The save launch trains to step 4, saves, and goes on uninterrupted
    to step 10; the resume launch loads that tag (converted once through DeepSpeed's universal checkpoint) and runs
    the same steps: checks and returns its ELASTIC row."""
    pytest.importorskip("transformers")
    common = ["--elastic_stage", str(stage), "--dir", str(tmp_path)] + (["--mlp"] if mlp else []) + (
        ["--bf16"] if bf16 else []) + ["--family", family]
    run_deepspeed(TP_CHECK, ["--elastic", "save", "--tp", str(save[1]), *common], num_gpus=save[0], timeout=600)
    ckpt = tmp_path / "checkpoints"
    tag = ck.tag_for(4)
    before = tree_digest(ckpt / tag)
    proc = run_deepspeed(TP_CHECK, ["--elastic", "resume", "--tp", str(resume[1]), *common], num_gpus=resume[0],
                         timeout=600)
    rows = tagged_json(proc.stdout, "ELASTIC")
    assert len(rows) == 1, proc.stdout[-4000:]
    r = rows[0]
    assert f"converting it now into {uc.universal_tag(tag)}" in proc.stdout and r["converted"], proc.stdout[-3000:]
    assert tree_digest(ckpt / tag) == before  # the source tag is read, never written
    udir = ckpt / uc.universal_tag(tag)
    assert ck.verify_tag(str(ckpt), uc.universal_tag(tag)) is None and uc.bad_steps(str(udir)) == []
    assert not list(ckpt.glob(uc.STAGING + "*")) and not list(ckpt.glob(".mat_ds_input.*"))
    # MAT's state after the load == the saved one; every weight through the conversion bit for bit
    assert r["mat_state_equal"], r["mat_diff"]
    assert r["frozen_saved"] and r["frozen_loaded"] == r["frozen_saved"]
    assert r["weights_equal"], r["weights_differ"]
    # the continuation matches the uninterrupted run (another TP size: another summation order; in bf16 rounded
    # differently: measured |Δloss| 1.3e-4, λ rel 2.8e-3)
    loss_tol, lam_tol = (5e-3, 5e-2) if bf16 else (1e-5, 1e-5)
    assert r["steps"] == list(range(4, 10))
    assert r["loss_max_abs_diff"] <= loss_tol, (r["losses"], r["losses_ref"])
    assert r["lambda_steps"] == r["lambda_steps_ref"] == [6, 9] and r["lambda_rel_err"] < lam_tol
    assert r["masks_equal"], r["masks"]
    # frozen units stay exactly unchanged from the load to the next refresh (step 6)
    assert r["frozen_units_checked"] > 0 and r["frozen_drift"] == 0.0
    what = f"{family} ZeRO-{stage}{' +mlp' if mlp else ''}{' bf16' if bf16 else ''}"
    print(f"{what} {r['topology_saved']} -> {r['topology']}: max |dloss| "
          f"{r['loss_max_abs_diff']:.2e}, lambda rel {r['lambda_rel_err']:.1e}, MAT state equal, "
          f"{r['n_weights']} weights bitwise, {r['frozen_units_checked']} frozen units drift {r['frozen_drift']}")
    return r


def test_tp2_resumes_at_tp1(tmp_path):
    """TP 2 (2 ranks, DeepSpeed AutoTP + mat_ds's head-wise sharding, ZeRO-1) -> TP 1 (1 rank)."""
    tp_elastic(tmp_path, stage=1, save=(2, 2), resume=(1, 1))


@pytest.mark.slow
@pytest.mark.parametrize("stage, save, resume, mlp", [
    (2, (2, 2), (1, 1), False),  # ZeRO-2 TP 2 -> TP 1
    (1, (1, 1), (2, 2), False),  # TP 1 -> TP 2
    (1, (4, 2), (2, 2), False),  # TP 2 x DP 2 -> TP 2 x DP 1
    (2, (2, 2), (1, 1), True),  # MLP units too
], ids=["zero2-tp2-tp1", "zero1-tp1-tp2", "zero1-tp2dp2-tp2dp1", "zero2-mlp-tp2-tp1"])
def test_tp_elastic_variants(tmp_path, stage, save, resume, mlp):
    tp_elastic(tmp_path, stage, save, resume, mlp)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["neox", "phi3"])
def test_tp_elastic_fused_qkv_families(tmp_path, family):
    """GPT-NeoX (per-head-interleaved query_key_value) and Phi-3 (blocked qkv_proj with GQA; AutoTP's packed
    gate_up_proj) TP 2 -> TP 1, ZeRO-1."""
    tp_elastic(tmp_path, stage=1, save=(2, 2), resume=(1, 1), family=family)


@pytest.mark.slow
@pytest.mark.skipif(not bf16_supported(), reason="DeepSpeed's accelerator has no bf16 here")
def test_tp_elastic_bf16(tmp_path):
    """bf16 (ZeRO-1, fp32 master weights and moments in the checkpoint) TP 2 -> TP 1."""
    tp_elastic(tmp_path, stage=1, save=(2, 2), resume=(1, 1), bf16=True)


@pytest.mark.slow
def test_tp_change_under_zero0_is_refused(tmp_path):
    """ZeRO-0 has nothing for ds_to_universal to convert: TP 2 -> TP 1 stops with one line, nothing on disk changed."""
    pytest.importorskip("transformers")
    common = ["--elastic_stage", "0", "--dir", str(tmp_path)]
    run_deepspeed(TP_CHECK, ["--elastic", "save", "--tp", "2", *common], num_gpus=2, timeout=600)
    before = tree_digest(tmp_path / "checkpoints")
    proc = run_deepspeed(TP_CHECK, ["--elastic", "resume", "--tp", "1", *common], num_gpus=1, timeout=600)
    rows = tagged_json(proc.stdout, "ELASTIC_REFUSED")
    assert len(rows) == 1 and "Traceback" not in proc.stdout, proc.stdout[-3000:]
    error = rows[0]["error"]
    assert "ZeRO-0 can neither make" in error and "\n" not in error, error
    assert tree_digest(tmp_path / "checkpoints") == before


@pytest.mark.slow
def test_trainer_tp2_resumes_at_tp1(tmp_path):
    """The project's trainer (``--model hf:LLAMA_DIR``, ``autotp_size`` 2, ZeRO-1, 2 ranks) saved after step 6 and
    resumed with the same command at TP 1 on 1 rank (``--universal auto``): converted once, MAT's state after the
    load equal to the saved one, the next losses and decisions equal to the uninterrupted TP-2 run's, frozen units
    unchanged (``--verify_frozen``) over the resumed steps."""
    tf = pytest.importorskip("transformers")
    model_dir = tmp_path / "llama"
    tf.LlamaConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=128, max_position_embeddings=64,
                   architectures=["LlamaForCausalLM"]).save_pretrained(model_dir)

    def config(name: str, tp: int) -> str:
        cfg = config_template("bert_mat_zero2.json")
        cfg["zero_optimization"] = {"stage": 1}
        cfg["train_micro_batch_size_per_gpu"] = 8
        cfg["mat"].update(warmup_steps=4, refresh_interval=4, alpha=0.3, beta=0.05, probe_samples=8)
        if tp > 1:
            cfg["tensor_parallel"] = {"autotp_size": tp}
        (tmp_path / name).write_text(json.dumps(cfg))
        return str(tmp_path / name)

    args = ["--model", f"hf:{model_dir}", "--cache_dir", str(tmp_path / "cache"), "--eval_interval", "0",
            "--seq_len", "64", "--vocab_size", "1024", "--verify_frozen", "--wandb_mode", "disabled",
            "--log_interval", "1", "--train_steps", str(END)]
    run_deepspeed(CHECK, ["--deepspeed_config", config("tp2.json", 2), "--out_dir", str(tmp_path / "straight"),
                          "--save_interval", str(SAVE_AT), *args], num_gpus=2, timeout=600)
    tag = ck.tag_for(SAVE_AT)
    source = tmp_path / "straight" / "checkpoints" / tag
    resumed_ckpt = tmp_path / "resumed" / "checkpoints"
    resumed_ckpt.mkdir(parents=True)
    shutil.copytree(source, resumed_ckpt / tag)
    (resumed_ckpt / "latest").write_text(tag)
    dump = tmp_path / "after_load.pt"
    proc = run_deepspeed(CHECK, ["--deepspeed_config", config("tp1.json", 1), "--out_dir", str(tmp_path / "resumed"),
                                 "--save_interval", str(END), *args], num_gpus=1, timeout=600,
                         env={"MAT_DS_UNIVERSAL_DUMP": str(dump)})
    assert f"converting it now into {uc.universal_tag(tag)}" in proc.stdout, proc.stdout[-3000:]
    after = torch.load(dump, map_location="cpu", weights_only=False)
    diff = same(client_state(source)["mat"], after["mat"])
    assert not diff, diff[:10]
    assert after["frozen"], "no unit frozen at the save: the test proves nothing"
    dloss, lam_err = resumed_matches_uninterrupted(tmp_path)
    assert lam_err <= 1e-4, lam_err
    print(f"trainer TP 2 -> TP 1: max |dloss| over steps {SAVE_AT + 1}..{END} = {dloss:.3e}, lambda rel {lam_err:.1e}; "
          f"MAT state equal; {len(after['frozen'])} frozen units")


# ----------------------------------------------------------------------------------------------------------------------
# A user's own loop (tests/scripts/wrapper_universal_check.py): mat_ds.initialize, engine.save_checkpoint, a universal
# copy made by hand, "checkpoint": {"load_universal": true}, engine.load_checkpoint(dir) at another DP size
# ----------------------------------------------------------------------------------------------------------------------
WRAPPER_CHECK = "tests/scripts/wrapper_universal_check.py"


@pytest.mark.slow
def test_users_loop_zero3_resumes_at_dp1_with_the_loader_repaired(tmp_path):
    """ZeRO-3, DP 2 -> DP 1 through DeepSpeed's own ``engine.load_checkpoint``: the engine ``mat_ds.initialize``
    returns mends DeepSpeed 0.19.8's stage-3 universal loader itself (``universal.repair_loads``), so the user's loop
    gets what the trainer gets: each param group's own weight decay, one Adam ``step`` per state at the saved count,
    MAT's state as saved and the uninterrupted run's losses."""
    pytest.importorskip("transformers")
    import subprocess
    import sys

    run_deepspeed(WRAPPER_CHECK, ["--mode", "save", "--dir", str(tmp_path)], num_gpus=2, timeout=600)
    subprocess.run([sys.executable, "-m", "mat_ds.universal", "--input_folder", str(tmp_path / "step4"),
                    "--output_folder", str(tmp_path / "step4_universal")], check=True, capture_output=True, cwd=REPO)
    assert (tmp_path / "latest_universal").read_text().strip() == "step4_universal"
    proc = run_deepspeed(WRAPPER_CHECK, ["--mode", "resume", "--dir", str(tmp_path)], num_gpus=1, timeout=600)
    rows = tagged_json(proc.stdout, "WRAPPER_UNIVERSAL")
    assert len(rows) == 1, proc.stdout[-4000:]
    r = rows[0]
    assert r["loaded"] and r["mat_state_equal"] and r["probe_equal"]
    before, after = r["repair"]["before"], r["repair"]["after"]  # fix_param_groups ran inside load_checkpoint
    assert after["weight_decay"] == [0.01, 0.0] and after["step_values"] == [4.0], after
    assert after["distinct_step_tensors"] == after["step_tensors"], after
    assert r["optimizer_end"]["step_values"] == r["optimizer_end_ref"]["step_values"] == [8.0], r["optimizer_end"]
    assert r["optimizer_end"]["weight_decay"] == r["optimizer_end_ref"]["weight_decay"]
    assert r["loss_max_abs_diff"] <= 1e-5, (r["losses"], r["losses_ref"])
    print(f"user's loop ZeRO-3 DP 2 -> DP 1: DeepSpeed's load left weight decay {before['weight_decay']} and "
          f"{before['distinct_step_tensors']} step tensor(s) for {before['step_tensors']} states; after the repair "
          f"{after['weight_decay']}, {after['distinct_step_tensors']}; max |dloss| over steps 4..7 "
          f"{r['loss_max_abs_diff']:.2e}; MAT state equal")
