"""Checkpoints that cannot be loaded, checkpoint retention (--keep_checkpoints), and one live run per --out_dir.

Default suite: the pure pieces (retention choice, tag verification and its one-line message, the save/load sequence
on a stand-in engine, the out_dir lock across processes, including a SIGKILLed holder). ``-m slow``: the same cases
through the real ``deepspeed`` launcher on 2 CPU ranks, with a SIGKILL of one rank in between.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mat_ds import checkpoint as ck
from mat_ds.config import ConfigError, RunConfig
from tests.launcher import REPO, deepspeed_command, deepspeed_env, free_port, kill_group, run_deepspeed


# ----------------------------------------------------------------------------------------------------------------------
# Retention: the pure choice
# ----------------------------------------------------------------------------------------------------------------------
def _tags(*steps: int) -> list[str]:
    return [ck.tag_for(s) for s in steps]


def test_retention_keeps_the_newest_and_the_protected():
    tags = _tags(5, 10, 15, 20, 25) + ["my_tag"]
    assert ck.retention_victims(tags, keep=0, protect=[]) == []  # 0 = keep all
    assert ck.retention_victims(tags, keep=3, protect=[]) == _tags(5, 10)  # by step, not by name: 5 < 10
    assert ck.retention_victims(tags, keep=1, protect=["global_step25"]) == _tags(5, 10, 15, 20)
    # the best one (and whatever `latest` names) survive on top of the N newest; other names are never removed
    assert ck.retention_victims(tags, keep=2, protect=["global_step10", None]) == _tags(5, 15)
    assert ck.retention_victims(tags, keep=10, protect=[]) == []
    assert ck.tag_step("global_step12") == 12 and ck.tag_step("global_step12x") is None


def test_keep_checkpoints_flag():
    assert RunConfig().keep_checkpoints == 3  # the project default: the 3 newest, plus latest and the best
    assert RunConfig(keep_checkpoints=0).keep_checkpoints == 0
    with pytest.raises(ConfigError, match="keep_checkpoints"):
        RunConfig(keep_checkpoints=-1)


# ----------------------------------------------------------------------------------------------------------------------
# Save / verify / load on a stand-in engine (DeepSpeed's file layout, torch.save'd files)
# ----------------------------------------------------------------------------------------------------------------------
class FakeEngine:
    """What checkpoint.save/load call on a DeepSpeed engine; writes one model-states and two optimizer shards."""

    def save_checkpoint(self, save_dir, tag, client_state, save_latest=True):
        assert save_latest is False  # mat_ds writes `latest` itself, after the manifest
        d = Path(save_dir) / tag
        d.mkdir(parents=True, exist_ok=True)
        torch.save({"w": torch.arange(1000.0), **client_state}, d / "mp_rank_00_model_states.pt")
        for r in range(2):
            torch.save({"exp_avg": torch.full((2000,), float(r))}, d / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")

    def load_checkpoint(self, save_dir, tag):
        d = Path(save_dir) / tag
        client = torch.load(d / "mp_rank_00_model_states.pt", weights_only=False)
        torch.load(d / "zero_pp_rank_1_mp_rank_00_optim_states.pt", weights_only=False)
        return str(d), client


def digest(path: Path) -> dict:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def test_save_writes_manifest_then_latest_and_applies_retention(tmp_path):
    eng, d = FakeEngine(), tmp_path / "ckpt"
    for step in range(1, 7):
        ck.save(eng, str(d), step, {"step": step}, keep=2, best="global_step2")
        assert ck.read_latest(str(d)) == ck.tag_for(step)
        assert ck.verify_tag(str(d), ck.tag_for(step)) is None
    assert ck.list_tags(str(d)) == _tags(2, 5, 6)  # the 2 newest + the best
    manifest = json.loads((d / "global_step6" / ck.MANIFEST).read_text())
    assert sorted(manifest["files"]) == ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                         "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert ck.load(eng, str(d), "auto") == {"step": 6}
    assert ck.load(eng, str(d), "global_step2") == {"step": 2}
    assert ck.load(eng, str(d), "never") is None
    # keep 0 keeps all; a half-removed tag left by a kill mid-removal (renamed .deleting.*) is cleared
    (d / ".deleting.global_step1").mkdir()
    ck.save(eng, str(d), 7, {"step": 7}, keep=0)
    assert ck.list_tags(str(d)) == _tags(2, 5, 6, 7) and not (d / ".deleting.global_step1").exists()


@pytest.mark.parametrize("damage", ["truncated", "missing", "crc", "no_manifest_truncated"])
def test_unloadable_checkpoint_is_one_short_line_naming_the_earlier_one(tmp_path, damage):
    eng, d = FakeEngine(), tmp_path / "ckpt"
    for step in (3, 6, 9):
        ck.save(eng, str(d), step, {"step": step}, keep=0)
    shard = d / "global_step9" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    bad_earlier = d / "global_step6" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    bad_earlier.unlink()  # global_step6 does not load either: the suggestion must skip it
    if damage == "truncated":
        os.truncate(shard, 1000)
        needle = "truncated file zero_pp_rank_1_mp_rank_00_optim_states.pt (1000 of"
    elif damage == "missing":
        shard.unlink()
        needle = "missing file zero_pp_rank_1_mp_rank_00_optim_states.pt"
    elif damage == "crc":  # same size, one byte flipped inside the tensor data
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
        needle = "CRC mismatch"
    else:  # a checkpoint without manifest (an older mat_ds): the files present are checked
        (d / "global_step9" / ck.MANIFEST).unlink()
        os.truncate(shard, 1000)
        needle = "zero_pp_rank_1_mp_rank_00_optim_states.pt is not a torch zip archive"
    before = digest(d)
    with pytest.raises(ck.CheckpointError) as info:
        ck.load(eng, str(d), "auto")
    msg = str(info.value)
    print(msg)
    assert info.value.every_rank and "\n" not in msg and len(msg) < 320, msg
    assert msg.startswith("checkpoint global_step9 in ") and needle in msg, msg
    assert msg.endswith("the newest earlier checkpoint that loads is global_step3: rerun with --resume global_step3")
    assert digest(d) == before
    # the named one does load
    assert ck.load(eng, str(d), "global_step3") == {"step": 3}


def test_no_loadable_checkpoint_and_missing_tag(tmp_path):
    eng, d = FakeEngine(), tmp_path / "ckpt"
    ck.save(eng, str(d), 2, {"step": 2}, keep=0)
    (d / "global_step2" / "mp_rank_00_model_states.pt").write_bytes(b"junk")
    with pytest.raises(ck.CheckpointError, match="no earlier checkpoint in it loads: start over with --resume never"):
        ck.load(eng, str(d), "auto")
    with pytest.raises(ck.CheckpointError, match="global_step99 .*its directory does not exist"):
        ck.load(eng, str(d), "global_step99")


# ----------------------------------------------------------------------------------------------------------------------
# One live run per out_dir
# ----------------------------------------------------------------------------------------------------------------------
HOLDER = """
import sys, time
from mat_ds.checkpoint import RunLock
lock = RunLock.acquire(sys.argv[1])
print("held", flush=True)
time.sleep(600)
"""


def _holder(out: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    for line in proc.stdout:  # importing mat_ds may log a line first (DeepSpeed's accelerator choice)
        if line.strip() == "held":
            return proc
    raise AssertionError("the holder process did not take the lock")


def test_run_lock_refuses_a_live_holder_and_not_a_killed_one(tmp_path):
    out = tmp_path / "run"
    holder = _holder(out)
    try:
        with pytest.raises(ck.RunLockedError) as info:
            ck.RunLock.acquire(str(out))
        msg = str(info.value)
        print(msg)
        assert f"pid {holder.pid} on host" in msg and "started 20" in msg and "\n" not in msg
        # lock_out_dir: the refusal reaches every rank (here: one process, no process group) as an every_rank error
        with pytest.raises(ck.RunLockedError) as info:
            ck.lock_out_dir(str(out), init=lambda: None)
        assert info.value.every_rank
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (out / ck.LOCK_NAME).exists()  # a SIGKILLed holder leaves its file, but the kernel dropped the lock
    lock = ck.lock_out_dir(str(out), init=lambda: None)
    info = json.loads((out / ck.LOCK_NAME).read_text())
    assert info["pid"] == os.getpid()
    lock.release()
    assert not (out / ck.LOCK_NAME).exists() and out.is_dir()
    # a lock that created the directory removes it again when nothing was written into it
    fresh = tmp_path / "fresh" / "run"
    ck.RunLock.acquire(str(fresh)).release()
    assert not fresh.exists()


def test_run_lock_is_for_rank_zero_only(tmp_path, monkeypatch):
    out = tmp_path / "run"
    lock = ck.RunLock.acquire(str(out))
    try:
        monkeypatch.setenv("RANK", "1")  # another rank of the SAME launch does not take (or test) the lock
        assert ck.lock_out_dir(str(out), init=lambda: None) is None
    finally:
        lock.release()


# ----------------------------------------------------------------------------------------------------------------------
# Through the real launcher (2 CPU ranks)
# ----------------------------------------------------------------------------------------------------------------------
TINY = ["--n_layer", "2", "--n_head", "2", "--d_model", "64", "--seq_len", "32", "--vocab_size", "256",
        "--eval_batches", "2", "--log_interval", "1", "--wandb_mode", "offline"]
SCRIPT = "launch/pretrain.py"


def _config(tmp_path: Path, lr: float = 1e-3) -> str:
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
           "steps_per_print": 1000000, "zero_optimization": {"stage": 2},
           "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": 0.01, "torch_adam": True}},
           "mat": {"policy": "mat", "alpha": 0.3, "warmup_steps": 2, "refresh_interval": 2, "probe_samples": 8}}
    path = tmp_path / f"ds_{lr}.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def _args(tmp_path: Path, cfg: str, out: str, *extra: str) -> list[str]:
    return ["--deepspeed_config", cfg, "--out_dir", str(tmp_path / out), "--cache_dir", str(tmp_path / "cache"),
            *TINY, *extra]


def _train(tmp_path, cfg, out, *extra, check=True, env=None):
    return run_deepspeed(SCRIPT, _args(tmp_path, cfg, out, *extra), num_gpus=2, check=check, timeout=300, env=env)


def _errors(proc) -> list[str]:
    return [line for line in proc.stdout.splitlines() if line.startswith("error:")]


def _ranks_direct(args: list[str], timeout: int = 300) -> list[tuple[int, str]]:
    """The 2 ranks started by hand with the launcher's environment, to read EACH rank's exit status (the deepspeed
    launcher reports the first one only and kills the rest)."""
    port, procs = free_port(), []
    for r in range(2):
        env = deepspeed_env({"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2", "LOCAL_SIZE": "2",
                             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
        procs.append(subprocess.Popen([sys.executable, "-u", SCRIPT, f"--local_rank={r}", *args], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return [(p.wait(timeout=timeout), p.stdout.read()) for p in procs]


@pytest.mark.slow
def test_real_corrupt_checkpoint_truncated_and_missing_shard(tmp_path):
    cfg = _config(tmp_path)
    _train(tmp_path, cfg, "run", "--train_steps", "6", "--save_interval", "3", "--eval_interval", "0")
    ckpt = tmp_path / "run" / "checkpoints"
    assert ck.list_tags(str(ckpt)) == _tags(3, 6) and ck.read_latest(str(ckpt)) == "global_step6"
    shard = ckpt / "global_step6" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    good = shard.read_bytes()
    rerun = ["--train_steps", "9", "--save_interval", "3", "--eval_interval", "0"]
    for damage, needle in [("truncated", "truncated file zero_pp_rank_1_mp_rank_00_optim_states.pt (1000 of"),
                           ("missing", "missing file zero_pp_rank_1_mp_rank_00_optim_states.pt")]:
        if damage == "truncated":
            shard.write_bytes(good[:1000])
        else:
            shard.unlink()
        before = digest(tmp_path / "run")
        proc = _train(tmp_path, cfg, "run", *rerun, check=False)
        errors = _errors(proc)
        print(damage, proc.returncode, errors)
        assert proc.returncode == 2 and len(errors) == 1, proc.stdout[-4000:]
        assert needle in errors[0] and errors[0].endswith("rerun with --resume global_step3") and len(errors[0]) < 320
        assert "Traceback" not in proc.stdout
        assert digest(tmp_path / "run") == before
        if damage == "missing":  # each rank, not only the launcher, ends with status 2; still one line
            ranks = _ranks_direct(_args(tmp_path, cfg, "run", *rerun))
            print("direct ranks:", [rc for rc, _ in ranks])
            assert [rc for rc, _ in ranks] == [2, 2]
            assert sum(len([l for l in out.splitlines() if l.startswith("error:")]) for _, out in ranks) == 1
            assert digest(tmp_path / "run") == before
    # the flag the line names works: resume from global_step3 (it rewrites global_step6 and goes on to 9)
    _train(tmp_path, cfg, "run", *rerun, "--resume", "global_step3")
    assert ck.read_latest(str(ckpt)) == "global_step9" and ck.verify_tag(str(ckpt), "global_step6") is None


@pytest.mark.slow
def test_real_retention_keeps_newest_latest_and_best(tmp_path):
    cfg = _config(tmp_path, lr=0.0)  # lr 0: the validation loss never beats its first value, so step 2 stays best
    _train(tmp_path, cfg, "keep", "--train_steps", "8", "--save_interval", "1", "--eval_interval", "2",
           "--keep_checkpoints", "2")
    ckpt = tmp_path / "keep" / "checkpoints"
    print(sorted(os.listdir(ckpt)))
    assert ck.list_tags(str(ckpt)) == _tags(2, 7, 8) and ck.read_latest(str(ckpt)) == "global_step8"
    assert not (tmp_path / "keep" / ck.LOCK_NAME).exists()  # released at the end


@pytest.mark.slow
def test_real_second_launch_refused_then_sigkill_of_a_rank_resumes(tmp_path):
    cfg = _config(tmp_path)
    # W&B off (WANDB_MODE wins over the flag): its service process lives outside the launcher's process group, so
    # SIGSTOP would not freeze its files
    steps = ["--train_steps", "400", "--save_interval", "2", "--eval_interval", "0", "--keep_checkpoints", "2"]
    off = {"WANDB_MODE": "disabled"}
    first = subprocess.Popen(deepspeed_command(SCRIPT, _args(tmp_path, cfg, "live", *steps)), cwd=REPO,
                             env=deepspeed_env(off), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    out = tmp_path / "live"
    try:
        deadline = time.time() + 240
        while time.time() < deadline and ck.tag_step(ck.read_latest(str(out / "checkpoints")) or "") is None:
            time.sleep(0.2)
        assert ck.read_latest(str(out / "checkpoints")), "the first run wrote no checkpoint"
        holder = json.loads((out / ck.LOCK_NAME).read_text())
        os.killpg(first.pid, signal.SIGSTOP)  # freeze the live run so that its directory can be compared
        time.sleep(0.5)
        before = digest(out)
        second = _train(tmp_path, cfg, "live", *steps, check=False, env=off)
        errors = _errors(second)
        print("second launch:", second.returncode, errors)
        assert second.returncode == 2 and len(errors) == 1, second.stdout[-4000:]
        assert f"pid {holder['pid']} on host {holder['host']}, started {holder['started']}" in errors[0]
        assert digest(out) == before
        os.killpg(first.pid, signal.SIGCONT)
        # SIGKILL rank 0, the lock's holder, mid-run: the launcher takes the rest down; the lock FILE stays (stale,
        # naming a dead pid) but the kernel dropped the lock with the process
        time.sleep(3)
        os.kill(_pid_of_rank(first.pid, 0), signal.SIGKILL)
        first.wait(timeout=120)
    finally:
        kill_group(first)
    latest = ck.read_latest(str(out / "checkpoints"))
    print("killed at latest =", latest, "tags", ck.list_tags(str(out / "checkpoints")))
    assert ck.verify_tag(str(out / "checkpoints"), latest) is None  # `latest` names a complete checkpoint
    assert len(ck.list_tags(str(out / "checkpoints"))) <= 2
    stale = json.loads((out / ck.LOCK_NAME).read_text())
    assert stale["pid"] == holder["pid"] and not Path(f"/proc/{stale['pid']}").exists()
    kept = digest(out / "checkpoints" / latest)
    third = _train(tmp_path, cfg, "live", *steps[2:], "--train_steps", str(ck.tag_step(latest) + 2), env=off)
    assert not _errors(third)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["trainer/step"] == ck.tag_step(latest) + 2
    assert digest(out / "checkpoints" / latest) == kept  # the checkpoint it resumed from is intact (and kept)


def _pid_of_rank(launcher_pid: int, rank: int) -> int:
    """The pid of ``--local_rank=RANK`` in the launcher's session."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = (Path("/proc") / pid / "cmdline").read_bytes().split(b"\0")
            sid = os.getsid(int(pid))
        except (OSError, ProcessLookupError):
            continue
        if sid == launcher_pid and f"--local_rank={rank}".encode() in cmd:
            return int(pid)
    raise AssertionError(f"no rank {rank} in session {launcher_pid}")
