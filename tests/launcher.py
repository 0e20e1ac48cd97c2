"""Run a script under the real ``deepspeed`` launcher (N CPU ranks over gloo) from a test.

Every multi-rank test goes through here so that the launch command is the one users type:
``deepspeed --num_gpus N --master_port P script.py args...``.

The launcher is started in its own session (process group). On a timeout the WHOLE group is killed: killing only the
``deepspeed`` process would leave ``launch.py`` and the ranks running as orphans, and a few hung launches would then
pile up until the machine runs out of memory (this is how CI once died with ``Killed`` after 5 hung launches).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_env(env: dict | None = None) -> dict:
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = os.pathsep.join([str(REPO), full_env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    full_env.setdefault("WANDB_MODE", "offline")
    full_env["PYTHONUNBUFFERED"] = "1"
    full_env.update(env or {})
    return full_env


def deepspeed_command(script: str | Path, args: list[str], num_gpus: int = 2) -> list[str]:
    launcher = Path(sys.executable).with_name("deepspeed")
    return [str(launcher) if launcher.exists() else "deepspeed", "--num_gpus", str(num_gpus),
            "--master_port", str(free_port()), str(script), *args]


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher's process group (launcher, launch.py, every rank) and reap the launcher."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def tagged_json(stdout: str, tag: str) -> list[dict]:
    """The JSON objects a check script printed as ``TAG {json}`` lines (rank 0 only), in order."""
    prefix = tag + " "
    return [json.loads(line[len(prefix):]) for line in stdout.splitlines() if line.startswith(prefix)]


def launch_cases(script: str | Path, cases: list[str], tag: str, key, timeout: int) -> dict[str, dict]:
    """One 2-rank launch of a check script for ``cases`` (``--cases a,b,...``): its ``TAG {json}`` rows by
    ``key(row)``. Fails (AssertionError with the output's tail) unless every case printed its row."""
    proc = run_deepspeed(script, ["--cases", ",".join(cases)], num_gpus=2, timeout=timeout)
    rows = {key(r): r for r in tagged_json(proc.stdout, tag)}
    missing = set(cases) - set(rows)
    assert not missing, f"no {tag} line for {sorted(missing)}:\n{proc.stdout[-6000:]}"
    return rows


PREFLIGHT_TIMEOUT = 240
_preflight: dict[str, str] = {}  # "ok" or "failed" -> launcher output; filled by the first run_deepspeed call


def preflight() -> None:
    """Run tests/scripts/dist_smoke.py once per test session; raise (every time) if 2 ranks could not all-reduce."""
    if not _preflight:
        try:
            res = _launch(REPO / "tests" / "scripts" / "dist_smoke.py", [], 2, PREFLIGHT_TIMEOUT, None, check=True)
            ok = "DIST_SMOKE ok" in res.stdout
            _preflight["ok" if ok else "failed"] = res.stdout[-6000:]
        except AssertionError as exc:
            _preflight["failed"] = str(exc)
    if "failed" in _preflight:
        raise AssertionError("multi-rank preflight (deepspeed --num_gpus 2 tests/scripts/dist_smoke.py) failed, so "
                             "no multi-rank test can pass on this machine:\n" + _preflight["failed"])


def run_deepspeed(script: str | Path, args: list[str], num_gpus: int = 2, timeout: int = 600,
                  env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Launch ``script`` on ``num_gpus`` CPU ranks; return the finished process (stdout+stderr in .stdout)."""
    preflight()
    return _launch(script, args, num_gpus, timeout, env, check)


def _launch(script, args, num_gpus, timeout, env, check) -> subprocess.CompletedProcess:
    cmd = deepspeed_command(script, args, num_gpus)
    proc = subprocess.Popen(cmd, cwd=REPO, env=deepspeed_env(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out = proc.stdout.read() if proc.stdout else ""
        raise AssertionError(f"deepspeed launch timed out after {timeout}s and was killed (whole process group); "
                             f"output tail:\n{out[-6000:]}") from None
    finally:
        # A launcher that exited normally has already reaped its ranks; this only catches stragglers.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    result = subprocess.CompletedProcess(cmd, proc.returncode, out, None)
    if check and result.returncode != 0:
        raise AssertionError(f"deepspeed launch failed (rc={result.returncode}):\n{out[-6000:]}")
    return result


def config_template(name: str) -> dict:
    """A shipped DeepSpeed JSON from ``configs/`` with its ``"mat"`` rule pinned to the one the tests were written for
    (the paper's α 0.1 / β 0.05 at a fixed refresh interval): these tests check mechanics (schedules, freezing,
    resume), not the shipped defaults, which tests/test_config.py and the README's ``make train`` check."""
    cfg = json.loads((REPO / "configs" / name).read_text())
    if (cfg.get("mat") or {}).get("policy") == "mat":
        cfg["mat"].update(alpha=0.1, beta=0.05)
        cfg["mat"].pop("refresh_backoff", None)
    return cfg
