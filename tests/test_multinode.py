"""Multi-node through the deepspeed launcher's multi-node paths, with two "nodes" on this one machine (docs/multinode.md),
and the GPU check's behaviour on a machine without a GPU (docs/gpu_check.md).

Node = one ``deepspeed`` launch with a two-host hostfile (``node0 slots=1``, ``node1 slots=1``); master 127.0.0.1.

* ``--no_ssh``: one launch per node with ``--node_rank 0|1`` (what a job scheduler's per-node script runs);
* the ssh path (the launcher's default, PDSH): one launch; ``pdsh`` is replaced by a stand-in that runs the per-node
  command locally in a FRESH environment (PATH/HOME/LANG only, as an ssh login would start), so anything the ranks see
  beyond that came through the launcher's exports: ``.deepspeed_env`` (HOME and the launch directory) and the
  ``PYTHON*`` variables.

The project's trainer runs (``tests/scripts/multinode_check.py`` = ``python -m mat_ds.pretrain`` + a per-rank trace of
every refresh) on 2 nodes x 1 rank and must decide exactly what a single-node 2-rank run decides, with the same losses.
Every launch is in its own process group; on a timeout or a failed node every group is killed.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.hardware import fp16_branch, fp16_supported
from tests.launcher import REPO, deepspeed_env, free_port, kill_group, run_deepspeed, config_template

SCRIPT = REPO / "tests" / "scripts" / "multinode_check.py"
GPU_CHECK = REPO / "scripts" / "gpu_check.sh"
STEPS, REFRESH, WARMUP = 30, 5, 10
TRAIN_ARGS = ["--n_layer", "2", "--n_head", "4", "--d_model", "64", "--seq_len", "64", "--vocab_size", "1024",
              "--train_steps", str(STEPS), "--eval_interval", "0", "--resume", "never",
              "--cache_dir", str(REPO / ".cache" / "mat_ds")]
TIMEOUT = 420
# One intra-op thread per rank in every layout: DeepSpeed sets LOCAL_SIZE=1 on each of 2 nodes but 2 on one node, and
# mat_ds.init_distributed derives the thread count from it; float summation order must not differ between layouts.
THREADS = {"OMP_NUM_THREADS": "1"}
MARK = "MAT_DS_MULTINODE_MARK"

PDSH_STANDIN = '''#!{python}
"""Stand-in for pdsh on ONE machine (tests/test_multinode.py): runs the command once per host of -w, locally, in a
fresh environment as an ssh login would start it, with %n -> the host's index and %h -> its name; output lines are
prefixed "host: " like pdsh's; exit status the largest of the hosts' (pdsh -S)."""
import os, subprocess, sys, threading

args, hosts, i = sys.argv[1:], [], 0
while i < len(args) and args[i].startswith("-"):
    if args[i] in ("-w", "-f", "-R", "-l"):
        if args[i] == "-w":
            hosts = args[i + 1].split(",")
        i += 2
    else:
        i += 1
command = " ".join(args[i:])
if command.lstrip().startswith("pkill"):
    sys.exit(0)  # the runner's cleanup-on-signal command (pkill -f by name): never reproduced here
env = {{"PATH": "/usr/bin:/bin", "HOME": os.environ["HOME"], "LANG": "C.UTF-8"}}
lock = threading.Lock()


def pump(host, proc):
    for line in proc.stdout:
        with lock:
            sys.stdout.write(host + ": " + line)
            sys.stdout.flush()


procs = [(h, subprocess.Popen(["bash", "-c", command.replace("%n", str(n)).replace("%h", h)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
         for n, h in enumerate(hosts)]
threads = [threading.Thread(target=pump, args=p) for p in procs]
for t in threads:
    t.start()
codes = [p.wait() for _, p in procs]
for t in threads:
    t.join()
sys.exit(max(codes))
'''


# ----------------------------------------------------------------------------------------------------------------------
# launching
# ----------------------------------------------------------------------------------------------------------------------
def ds_launcher() -> str:
    launcher = Path(sys.executable).with_name("deepspeed")
    return str(launcher) if launcher.exists() else "deepspeed"


def write_config(path: Path) -> Path:
    cfg = config_template("bert_mat_zero2.json")
    cfg["mat"].update(warmup_steps=WARMUP, refresh_interval=REFRESH, alpha=0.3, log_heatmap_interval=0)
    cfg["scheduler"]["params"]["warmup_num_steps"] = 5
    assert cfg["zero_optimization"]["stage"] == 2
    path.write_text(json.dumps(cfg, indent=1))
    return path


def write_hostfile(path: Path) -> Path:
    path.write_text("node0 slots=1\nnode1 slots=1\n")
    return path


def launch_all(cmds: list[list[str]], cwd: Path, envs: list[dict], logs: list[Path], timeout: int) -> list[str]:
    """Start every command in its own session; wait for all. A node that fails makes its peers wait for a rendezvous
    that never comes, so after the first failure (or at the timeout) every process group is killed."""
    procs, handles = [], []
    try:
        for cmd, env, log in zip(cmds, envs, logs):
            fh = open(log, "w")
            handles.append(fh)
            procs.append(subprocess.Popen(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT, text=True,
                                          start_new_session=True))
        deadline = time.monotonic() + timeout
        failed_at = None
        while any(p.poll() is None for p in procs):
            now = time.monotonic()
            if failed_at is None and any(p.returncode not in (None, 0) for p in procs):
                failed_at = now
            if now > deadline or (failed_at is not None and now > failed_at + 20):
                break
            time.sleep(0.5)
    finally:
        running = [p for p in procs if p.poll() is None]
        for p in procs:
            kill_group(p)  # the whole group (launcher, launch.py, ranks); stragglers of finished launches too
        for fh in handles:
            fh.close()
    outs = [log.read_text(errors="replace") for log in logs]
    if running or any(p.returncode != 0 for p in procs):
        tails = "\n".join(f"--- {cmd[:6]}... rc={p.returncode}{' (killed: timeout/peer failed)' if p in running else ''}"
                          f"\n{out[-4000:]}" for cmd, p, out in zip(cmds, procs, outs))
        raise AssertionError(f"multi-node launch failed:\n{tails}")
    return outs


def records(out: str, tag: str = "MULTINODE") -> list[dict]:
    """``TAG {json}`` records, also after pdsh's ``host: `` prefix or another rank's unterminated output (each record
    is written with one write(2), see multinode_check.emit)."""
    pattern = re.compile(rf"{tag} (\{{.*\}})\s*$")
    return [json.loads(m.group(1)) for line in out.splitlines() if (m := pattern.search(line))]


def losses(out_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["train/loss"] for r in rows if "train/loss" in r]


def decisions(recs: list[dict]) -> list[tuple]:
    return [(r["step"], tuple(r["frozen_heads"]), tuple(r["lambda"])) for r in recs]


# ----------------------------------------------------------------------------------------------------------------------
# the single-node reference: deepspeed --num_gpus 2 (tests/launcher.py), same seed, same config
# ----------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def single_node(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("single")
    config = write_config(tmp / "ds.json")
    res = run_deepspeed(SCRIPT, ["--deepspeed_config", str(config), *TRAIN_ARGS, "--out_dir", str(tmp / "run")],
                        num_gpus=2, timeout=TIMEOUT, env={**THREADS, "WANDB_MODE": "disabled"})
    recs = records(res.stdout)
    by_rank = {r: [x for x in recs if x["rank"] == r] for r in (0, 1)}
    assert [x["step"] for x in by_rank[0]] == list(range(0, STEPS, REFRESH)), res.stdout[-3000:]
    assert decisions(by_rank[0]) == decisions(by_rank[1])
    return {"decisions": decisions(by_rank[0]), "losses": losses(tmp / "run")}


def check_against_single(node_recs: dict[int, list[dict]], out_dir: Path, single: dict) -> None:
    # each node's rank traced every refresh, and knows its node rank from the launcher (CROSS_RANK)
    for node, recs in node_recs.items():
        assert recs and all(r["node_rank"] == node and r["rank"] == node and r["world"] == 2 for r in recs)
        assert [r["step"] for r in recs] == list(range(0, STEPS, REFRESH))
    # identical decisions (and λmax) on both nodes: rank 0 decided, the mask was broadcast
    assert decisions(node_recs[0]) == decisions(node_recs[1])
    frozen_per_refresh = [sum(r["frozen_heads"]) for r in node_recs[0]]
    assert frozen_per_refresh[:WARMUP // REFRESH] == [0] * (WARMUP // REFRESH)  # nothing frozen in the warm-up
    assert any(frozen_per_refresh), "alpha 0.3 after warm-up should freeze some heads (decisions would be trivial)"
    # and exactly what one node with 2 ranks decides, with bit-identical losses
    assert decisions(node_recs[0]) == single["decisions"]
    got = losses(out_dir)
    assert len(got) == STEPS and got == single["losses"], (got, single["losses"])


# ----------------------------------------------------------------------------------------------------------------------
# --no_ssh: one launch per node
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_nodes_no_ssh_match_single_node(tmp_path, single_node):
    launch_dir, home = tmp_path / "launch", tmp_path / "home"
    launch_dir.mkdir()
    home.mkdir()
    config, hostfile = write_config(tmp_path / "ds.json"), write_hostfile(tmp_path / "hostfile")
    # DeepSpeed 0.19.8 reads .deepspeed_env only on its ssh/pdsh/mpi path: with --no_ssh it must NOT reach the ranks
    (launch_dir / ".deepspeed_env").write_text(f"{MARK}=from-deepspeed-env\n")
    port = free_port()
    cmds, envs = [], []
    for node in (0, 1):
        cmds.append([ds_launcher(), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node),
                     "--master_addr", "127.0.0.1", "--master_port", str(port), "--num_nodes", "2", "--num_gpus", "1",
                     str(SCRIPT), "--deepspeed_config", str(config), *TRAIN_ARGS, "--out_dir", str(tmp_path / "run")])
        # each node's own environment is what its ranks get (a scheduler's per-node job script sets it)
        envs.append(deepspeed_env({**THREADS, "HOME": str(home), "WANDB_MODE": "disabled",
                                   "MAT_DS_NODE_ENV": f"node{node}"}))
    outs = launch_all(cmds, launch_dir, envs, [tmp_path / "node0.log", tmp_path / "node1.log"], TIMEOUT)

    for node, out in enumerate(outs):
        (env,) = records(out, "MULTINODE_ENV")
        assert env["node_rank"] == node and env["rank"] == node
        e = env["env"]
        assert (e["CROSS_RANK"], e["CROSS_SIZE"], e["LOCAL_SIZE"], e["WORLD_SIZE"], e["MASTER_ADDR"]) == \
            (str(node), "2", "1", "2", "127.0.0.1")
        assert e["MAT_DS_NODE_ENV"] == f"node{node}"
        assert MARK not in e, "--no_ssh launches do not read .deepspeed_env (DeepSpeed 0.19.8)"
    check_against_single({node: records(out) for node, out in enumerate(outs)}, tmp_path / "run", single_node)


# ----------------------------------------------------------------------------------------------------------------------
# the ssh path (PDSH launcher), with pdsh replaced by a local stand-in; environment only via the launcher's exports
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_nodes_pdsh_path_deepspeed_env_reaches_every_node(tmp_path, single_node):
    launch_dir, home, bindir = tmp_path / "launch", tmp_path / "home", tmp_path / "bin"
    for d in (launch_dir, home, bindir):
        d.mkdir()
    pdsh = bindir / "pdsh"
    pdsh.write_text(PDSH_STANDIN.format(python=sys.executable))
    pdsh.chmod(0o755)
    config, hostfile = write_config(tmp_path / "ds.json"), write_hostfile(tmp_path / "hostfile")
    # read from $HOME first, then from the directory the launcher is started in (later lines win)
    (home / ".deepspeed_env").write_text("MAT_DS_HOME_MARK=from-home\n")
    (launch_dir / ".deepspeed_env").write_text(
        f"WANDB_MODE=offline\n{MARK}=from-deepspeed-env\nMAT_DS_DIST_TIMEOUT_MIN=5\nOMP_NUM_THREADS=1\n")
    env = deepspeed_env({"PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}", "HOME": str(home),
                         "WANDB_MODE": "disabled", "MAT_DS_NOT_EXPORTED": "launcher-only"})
    env.pop("OMP_NUM_THREADS", None)
    cmd = [ds_launcher(), "--hostfile", str(hostfile), "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "--no_ssh_check", "--launcher", "pdsh",
           str(SCRIPT), "--deepspeed_config", str(config), *TRAIN_ARGS, "--out_dir", str(tmp_path / "run")]
    (out,) = launch_all([cmd], launch_dir, [env], [tmp_path / "launch.log"], TIMEOUT)

    envs = {r["node_rank"]: r for r in records(out, "MULTINODE_ENV")}
    assert sorted(envs) == [0, 1]
    for node, rec in envs.items():
        e = rec["env"]
        assert rec["rank"] == node and e["CROSS_RANK"] == str(node) and e["WORLD_SIZE"] == "2"
        # the launcher's own environment did not travel (fresh login) except PYTHON* (DeepSpeed's EXPORT_ENVS) ...
        assert "MAT_DS_NOT_EXPORTED" not in e
        assert str(REPO) in e["PYTHONPATH"].split(os.pathsep)
        # ... and .deepspeed_env from HOME and the launch directory, the latter winning over the launcher's WANDB_MODE
        assert e[MARK] == "from-deepspeed-env" and e["MAT_DS_HOME_MARK"] == "from-home"
        assert e["WANDB_MODE"] == "offline" and e["MAT_DS_DIST_TIMEOUT_MIN"] == "5" and e["OMP_NUM_THREADS"] == "1"
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*")), "rank 0 should have logged to W&B offline"
    recs = records(out)
    check_against_single({n: [r for r in recs if r["node_rank"] == n] for n in (0, 1)}, tmp_path / "run", single_node)


# ----------------------------------------------------------------------------------------------------------------------
# scripts/gpu_check.sh on a machine without a GPU
# ----------------------------------------------------------------------------------------------------------------------
def _gpu_check(tmp_path: Path, path_prefix: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("GPU_CHECK_ALLOW_CPU", None)
    if path_prefix:
        env["PATH"] = path_prefix + os.pathsep + env.get("PATH", "")
    return subprocess.run(["bash", str(GPU_CHECK), "--out", str(tmp_path / "out")], env=env, capture_output=True,
                          text=True, timeout=120)


def test_gpu_check_without_gpu_exits_2_with_one_line(tmp_path):
    from shutil import which

    res = _gpu_check(tmp_path)
    if which("nvidia-smi") is None:
        assert res.returncode == 2, res.stderr
        assert res.stdout == "" and len(res.stderr.strip().splitlines()) == 1
        assert "no CUDA GPU" in res.stderr
    # an nvidia-smi that lists nothing (driver present, no device), and one that lists a GPU torch cannot see
    fake = tmp_path / "bin"
    fake.mkdir()
    for listing, message in (("", "no CUDA GPU"), ("GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)", "sees no CUDA device")):
        (fake / "nvidia-smi").write_text(f"#!/bin/sh\necho '{listing}'\n")
        (fake / "nvidia-smi").chmod(0o755)
        res = _gpu_check(tmp_path, str(fake))
        if listing and _torch_has_cuda():
            continue  # a real GPU machine: this case does not apply
        assert res.returncode == 2, (res.stdout, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1 and message in res.stderr, res.stderr
    assert not (tmp_path / "out").exists(), "nothing may be launched or written without a GPU"


def _torch_has_cuda() -> bool:
    import torch
    return torch.cuda.is_available()


@pytest.mark.slow
def test_gpu_check_script_dry_run_on_cpu(tmp_path):
    """The whole script on 2 gloo ranks (GPU_CHECK_ALLOW_CPU=1, --quick): its pieces run and its table adds up."""
    env = dict(os.environ, GPU_CHECK_ALLOW_CPU="1", OMP_NUM_THREADS="1")
    out = tmp_path / "out"
    proc = subprocess.Popen(["bash", str(GPU_CHECK), "--quick", "--out", str(out)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        stdout, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise AssertionError("gpu_check.sh dry run timed out (process group killed)") from None
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, stdout[-5000:]
    rows = [json.loads(line) for f in ("gpu_check.jsonl", "trainer.jsonl")
            for line in (out / f).read_text().splitlines() if line.strip()]
    by = {(r["check"], r["case"]): r for r in rows}
    assert by[("backend", "gloo x2")]["ok"]
    assert by[("freeze", "own:z2:bf16")]["ok"] and by[("freeze", "switch:z2:bf16")]["ok"]
    # fp16 follows the accelerator (the query mat_ds.initialize makes), asked here and on every launched rank
    fp16 = fp16_supported()
    for r in rows:
        if r["check"] != "trainer":
            assert r["fp16_supported"] == [fp16, fp16], (r["case"], r["fp16_supported"], fp16)
    half = by[("freeze", "own:z3:fp16")]
    print(f"gpu_check dry run: {fp16_branch()}; own:z3:fp16 -> {half.get('detail')}")
    if fp16:  # it ran: frozen weights, fp32 master and Adam state exactly unchanged, no step skipped on its own
        assert half["ok"] and not half.get("skipped"), half
        assert half["frozen_weight_drift"] == 0.0 and half["frozen_master_state_drift"] == 0.0, half
        assert half["skipped_steps"] == 0 and len(half["losses"]) == 4, half  # step 0 + --freeze_steps 3
    else:
        assert half.get("skipped") and "reports no fp16" in half["detail"], half
    for case in ("tiny:materialized", "tiny:ghost", "tiny:auto"):
        assert by[("refresh", case)]["ok"]
    trainer = by[("trainer", "pretrain x2 bf16 z2")]
    assert trainer["ok"] and trainer["frozen_max_abs_change"] == 0.0 and len(trainer["losses"]) == 20
    assert f"{len(rows)} checks, 0 failed" in stdout
