"""Launching benchmark runs: one ``deepspeed ... launch/pretrain.py`` per (seed, method), resumable.

A run directory holds ``spec.json`` (the DeepSpeed config + flags + rank count it was launched with), ``launch.log``,
``metrics.jsonl`` and, once it finished, ``done.json`` and ``metrics.jsonl.gz`` (the record a report reads where the
live file is gone: ``benchmarks/records/`` commits spec, done, record and log, not checkpoints or W&B files).
``ensure_run`` skips a complete run with an unchanged spec, resumes an interrupted one from its last checkpoint, and
continues a finished run whose only change is a larger step cap (``--train_steps``) or a later start of early stopping
(``--patience_from``) from its kept final checkpoint. Used by ``benchmarks/paper_table.py`` and
``benchmarks/converge.py``.
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
    from benchmarks.store import REPO, is_complete, metrics_path, read_rows, repo_relative, run_dir, write_record
except ImportError:  # python benchmarks/paper_table.py: this directory is sys.path[0], the repository root is not
    from store import (REPO, is_complete, metrics_path, read_rows, repo_relative, run_dir,  # type: ignore[no-redef]
                       write_record)


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
        return read_rows(metrics_path(d))
    # A finished run whose only change is a larger --train_steps or a later --patience_from goes on from its kept
    # final checkpoint, unless it would have ended the same under the new spec (then it is kept as it is).
    extend = old is not None and continues(old, spec) and (d / "checkpoints" / "latest").is_file()
    if extend and is_complete(d) and stop_is_final(d, old, spec):
        print(f"[paper_table] seed {seed} {method:9s} would end the same under the new cap/patience_from, kept",
              flush=True)
        return read_rows(metrics_path(d))
    earlier_seconds = 0.0
    if extend and (d / "done.json").is_file():
        earlier_seconds = float(json.loads((d / "done.json").read_text()).get("launch_seconds", 0.0))
    d.mkdir(parents=True, exist_ok=True)
    (d / "done.json").unlink(missing_ok=True)
    (d / "ds_config.json").write_text(json.dumps(cfg, indent=2))
    spec_path.write_text(json.dumps(spec, indent=2))
    launcher = Path(sys.executable).with_name("deepspeed")
    cmd = [repo_relative(launcher) if launcher.exists() else "deepspeed"]
    if num_gpus is not None:
        cmd += ["--num_gpus", str(num_gpus)]
    cmd += ["--master_port", str(free_port()), "launch/pretrain.py", "--deepspeed_config",
            repo_relative(d / "ds_config.json"), "--out_dir", repo_relative(d),
            "--resume", "auto" if same or extend else "never", *run_args]
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
    rows = read_rows(metrics_path(d))
    (d / "done.json").write_text(json.dumps({
        "rc": rc, "launch_seconds": seconds, "loadavg_1min_before": load_before, "loadavg_1min_after": os.getloadavg()[0],
        "finished": _dt.datetime.now().isoformat(timespec="seconds"), "steps": rows[-1]["trainer/step"] if rows else 0,
    }, indent=2))
    write_record(d)
    if not keep_checkpoints:
        shutil.rmtree(d / "checkpoints", ignore_errors=True)
    else:
        prune_checkpoints(d / "checkpoints")
    last = [r for r in rows if "val/loss" in r]
    print(f"[paper_table] seed {seed} {method:9s} done: {seconds:6.1f} s, {rows[-1]['trainer/step'] if rows else 0} steps"
          + (f", final val {last[-1]['val/loss']:.4f}" if last else ""), flush=True)
    return rows


def _split_continuable(spec: dict) -> tuple[dict, Optional[int], int]:
    """A run spec without the two flags a finished run can be continued under (``--train_steps``, the step cap, and
    ``--patience_from``, where early stopping starts counting), and their values (cap None when the spec has none)."""
    args, found = list(spec.get("args", [])), {}
    for flag in ("--train_steps", "--patience_from"):
        if flag in args:
            i = args.index(flag)
            found[flag] = int(args[i + 1])
            args = args[:i] + args[i + 2:]
    return {**spec, "args": args}, found.get("--train_steps"), found.get("--patience_from", 0)


def continues(old: dict, new: dict) -> bool:
    """True if ``new`` is ``old`` with a larger step cap and/or a later ``--patience_from`` (and nothing else changed):
    the finished run can go on from its final checkpoint instead of training again."""
    (a, cap_a, from_a), (b, cap_b, from_b) = _split_continuable(old), _split_continuable(new)
    return (a == b and cap_a is not None and cap_b is not None and cap_b >= cap_a and from_b >= from_a
            and (cap_b, from_b) != (cap_a, from_a))


def stop_is_final(d: Path, old: dict, new: dict) -> bool:
    """A complete run (spec ``old``) that would have ended at the same step under ``new`` (see ``continues``).

    Ended by its cap: only a larger cap moves it. Ended by early stopping: a larger cap changes nothing, a later
    ``--patience_from`` changes nothing while the best evaluation it counted is at or after that step (the same
    evaluations follow the same best); otherwise the run would have gone on."""
    _, cap_old, from_old = _split_continuable(old)
    _, cap_new, from_new = _split_continuable(new)
    steps = int(json.loads((d / "done.json").read_text()).get("steps", cap_old))
    if steps >= cap_old:
        return cap_new <= cap_old
    rows = read_rows(metrics_path(d))
    key = "test/loss" if any("test/loss" in r for r in rows) else "val/loss"
    counted = [(r[key], r["trainer/step"]) for r in rows if key in r and r["trainer/step"] >= from_old]
    return not counted or min(counted)[1] >= from_new


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
