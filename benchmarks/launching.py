"""Launching benchmark runs: one ``deepspeed ... launch/pretrain.py`` per (seed, method), resumable.

A run directory holds ``spec.json`` (the DeepSpeed config + flags + rank count it was launched with), ``launch.log``,
``metrics.jsonl`` and, once it finished, ``done.json``. ``ensure_run`` skips a complete run with an unchanged spec,
resumes an interrupted one from its last checkpoint, and continues a finished run whose only change is a larger step cap
(``--train_steps``) from its kept final checkpoint. Used by ``benchmarks/paper_table.py`` and ``benchmarks/converge.py``.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

try:  # python -m benchmarks.paper_table (from the repository root), or imported (tests)
    from benchmarks.plots import REPO, is_complete, read_rows, run_dir
except ImportError:  # python benchmarks/paper_table.py: this directory is sys.path[0], the repository root is not
    from plots import REPO, is_complete, read_rows, run_dir  # type: ignore[no-redef]


def ensure_run(out: Path, seed: int, method: str, cfg: dict, run_args: list[str], num_gpus: Optional[int],
               keep_checkpoints: bool = False) -> list[dict]:
    """Launch one run unless an identical one already completed; return its merged rows. Raises on failure."""
    d = run_dir(out, seed, method)
    spec = {"ds_config": cfg, "args": run_args, "num_gpus": num_gpus}
    spec_path = d / "spec.json"
    old = json.loads(spec_path.read_text()) if spec_path.is_file() else None
    same = old == spec
    if same and is_complete(d):
        print(f"[paper_table] seed {seed} {method:9s} already complete, skipped", flush=True)
        return read_rows(d / "metrics.jsonl")
    # A finished run whose only change is a larger --train_steps goes on from its kept final checkpoint, unless it
    # ended before its old cap (early stopping): a longer cap would not have changed it.
    extend = old is not None and extends_cap(old, spec) and (d / "checkpoints" / "latest").is_file()
    if extend and is_complete(d) and ended_before_cap(d, old):
        print(f"[paper_table] seed {seed} {method:9s} ended by early stopping before its cap, kept", flush=True)
        return read_rows(d / "metrics.jsonl")
    earlier_seconds = 0.0
    if extend and (d / "done.json").is_file():
        earlier_seconds = float(json.loads((d / "done.json").read_text()).get("launch_seconds", 0.0))
    d.mkdir(parents=True, exist_ok=True)
    (d / "done.json").unlink(missing_ok=True)
    (d / "ds_config.json").write_text(json.dumps(cfg, indent=2))
    spec_path.write_text(json.dumps(spec, indent=2))
    launcher = Path(sys.executable).with_name("deepspeed")
    cmd = [str(launcher) if launcher.exists() else "deepspeed"]
    if num_gpus is not None:
        cmd += ["--num_gpus", str(num_gpus)]
    cmd += ["--master_port", str(free_port()), "launch/pretrain.py", "--deepspeed_config", str(d / "ds_config.json"),
            "--out_dir", str(d), "--resume", "auto" if same or extend else "never", *run_args]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    print(f"[paper_table] seed {seed} {method:9s} running ...", flush=True)  # own line: runs may go side by side
    load_before, t0 = os.getloadavg()[0], time.perf_counter()
    with open(d / "launch.log", "w", encoding="utf-8") as log:
        log.write(shlex.join(cmd) + "\n")
        log.flush()
        rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - t0 + earlier_seconds
    if rc != 0:
        tail = (d / "launch.log").read_text(errors="replace").splitlines()[-15:]
        print(f"[paper_table] seed {seed} {method:9s} FAILED\n" + "\n".join(tail), flush=True)
        raise RuntimeError(f"{method} (seed {seed}) failed with exit status {rc}; see {d / 'launch.log'}")
    rows = read_rows(d / "metrics.jsonl")
    (d / "done.json").write_text(json.dumps({
        "rc": rc, "launch_seconds": seconds, "loadavg_1min_before": load_before, "loadavg_1min_after": os.getloadavg()[0],
        "finished": _dt.datetime.now().isoformat(timespec="seconds"), "steps": rows[-1]["trainer/step"] if rows else 0,
    }, indent=2))
    if not keep_checkpoints:
        shutil.rmtree(d / "checkpoints", ignore_errors=True)
    else:
        prune_checkpoints(d / "checkpoints")
    last = [r for r in rows if "val/loss" in r]
    print(f"[paper_table] seed {seed} {method:9s} done: {seconds:6.1f} s, {rows[-1]['trainer/step'] if rows else 0} steps"
          + (f", final val {last[-1]['val/loss']:.4f}" if last else ""), flush=True)
    return rows


def _split_cap(spec: dict) -> tuple[dict, Optional[int]]:
    """A run spec without its ``--train_steps``, and that cap (None when the spec has none)."""
    args = list(spec.get("args", []))
    if "--train_steps" not in args:
        return spec, None
    i = args.index("--train_steps")
    return {**spec, "args": args[:i] + args[i + 2:]}, int(args[i + 1])


def extends_cap(old: dict, new: dict) -> bool:
    """True if ``new`` differs from ``old`` only by a larger ``--train_steps`` (a longer cap for the same run)."""
    (a, sa), (b, sb) = _split_cap(old), _split_cap(new)
    return a == b and sa is not None and sb is not None and sb > sa


def ended_before_cap(d: Path, spec: dict) -> bool:
    """A complete run that stopped before the ``--train_steps`` of its spec (early stopping ended it)."""
    cap = _split_cap(spec)[1]
    return cap is not None and int(json.loads((d / "done.json").read_text()).get("steps", cap)) < cap


def prune_checkpoints(directory: Path) -> None:
    """Keep only the checkpoint ``latest`` names (what a longer run would resume from); drop the intermediate ones."""
    latest = directory / "latest"
    if not latest.is_file():
        return
    keep = latest.read_text().strip()
    for tag in directory.glob("global_step*"):
        if tag.name != keep:
            shutil.rmtree(tag, ignore_errors=True)


def free_port() -> int:
    """A free TCP port for the launcher's rendezvous (the same helper as ``tests/launcher.py``, kept here so the
    benchmarks do not import the tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
