"""The test launcher itself: a launch that overruns its timeout is killed with ALL its processes (no orphans)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import pytest

from tests.launcher import REPO, run_deepspeed

SMOKE = REPO / "tests" / "scripts" / "dist_smoke.py"


def _alive(tag: str) -> list[str]:
    out = subprocess.run(["pgrep", "-af", tag], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "pgrep" not in line]


def test_two_ranks_all_reduce_under_the_launcher():
    out = run_deepspeed(SMOKE, []).stdout
    assert "DIST_SMOKE ok world=2 backend=gloo" in out


def test_timeout_kills_launcher_and_ranks():
    tag = f"hang-{uuid.uuid4().hex[:8]}"
    with pytest.raises(AssertionError, match="timed out after 25s"):
        run_deepspeed(SMOKE, ["--sleep", "600", "--tag", tag], timeout=25)
    time.sleep(1.0)
    assert _alive(tag) == [], "processes of the timed-out launch survived"


def test_exit_process_keeps_the_status_and_flushes_piped_output():
    """The command-line entry points end with exit_process (os._exit, no interpreter finalization): the status is the
    run's own, and output still buffered in a pipe is written first."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # block-buffered, as in a batch job
    code = ("import logging, sys; from mat_ds.distributed import exit_process; logging.basicConfig(); "
            "print('last line', end=''); print('last error', end='', file=sys.stderr); "
            "logging.getLogger('x').warning('logged'); exit_process(3)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env,
                         timeout=120)
    assert res.returncode == 3
    assert res.stdout.endswith("last line")
    assert "last error" in res.stderr and "logged" in res.stderr
