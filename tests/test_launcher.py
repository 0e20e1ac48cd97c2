"""The test launcher itself: a launch that overruns its timeout is killed with ALL its processes (no orphans)."""
from __future__ import annotations

import subprocess
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
