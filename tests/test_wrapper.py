"""mat_ds.initialize's promises on 2 real ranks: passthrough without a "mat" block, a one-line error for a model with
no units, a user's own model via make_headwise, the probe set captured from training batches, MAT state through
engine.save_checkpoint/load_checkpoint (tests/scripts/wrapper_check.py)."""
from __future__ import annotations

import pytest

from tests.launcher import REPO, run_deepspeed, tagged_json


@pytest.fixture(scope="module")
def cases() -> dict:
    proc = run_deepspeed(REPO / "tests" / "scripts" / "wrapper_check.py", [], num_gpus=2, timeout=600)
    out: dict = {}
    for row in tagged_json(proc.stdout, "WRAPPER_CHECK"):
        out.setdefault(row["case"], []).append(row)
    return out


def test_without_mat_block_it_is_deepspeed(cases):
    rows = cases["passthrough"]
    assert [r["mat"] for r in rows] == [None, {"enabled": False}]
    for r in rows:
        assert r["is_ds"] and r["engine_type"] == "DeepSpeedEngine" and not r["has_mat"] and r["headwise"] == 0


def test_model_without_units_is_a_one_line_error(cases):
    (row,) = cases["unknown"]
    assert row["error"] and "\n" not in row["error"] and "make_headwise" in row["error"]


def test_own_model_through_make_headwise(cases):
    (row,) = cases["custom"]
    assert row["units"] == 8 and row["lam_keys"] == 8
    assert row["active"][:2] == [1.0, 1.0] and min(row["active"]) < 1.0  # warm-up, then MAT freezes
    assert row["losses"][-1] < row["losses"][0]


def test_probe_set_captured_from_training_batches(cases):
    by_n = {r["n"]: r for r in cases["capture"]}
    assert by_n[8]["refreshes"] == [0, 2, 4]  # 2 ranks x 4 samples fill it at step 0
    assert by_n[16]["refreshes"] == [2, 4]  # full only after step 1: first refresh step after that
    assert all(r["probe_is_first_batches"] and r["probe_rows"] == r["n"] for r in by_n.values())


def test_checkpoint_carries_mat_state(cases):
    (row,) = cases["checkpoint"]
    assert any(row["frozen_at_save"]) and row["same_state"]
    assert row["max_loss_diff"] == 0.0
    assert row["frozen_after_resumed"] == row["frozen_after"]
