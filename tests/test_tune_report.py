"""The tuned-baseline sweep's report math (benchmarks/tune.py), by hand: the LR is chosen on validation loss only."""
from __future__ import annotations

from pathlib import Path

from benchmarks import tune


def _rows(val, test):
    return [{"trainer/step": 100 * (i + 1), "val/loss": v, "test/loss": t, "perf/flops_cumulative": 1e12 * (i + 1)}
            for i, (v, t) in enumerate(zip(val, test))]


def test_sweep_point_reads_val_best_and_the_test_loss_there():
    p = tune.sweep_point(_rows([5.0, 4.2, 4.5], [5.1, 4.4, 4.3]))
    assert (p["best_val"], p["best_val_step"], p["test_at_best_val"]) == (4.2, 200.0, 4.4)
    assert (p["best_test"], p["best_test_step"], p["steps"]) == (4.3, 300.0, 300.0)


def test_choose_by_validation_never_by_test():
    points = {(3000, 1e-3): {"best_val": 4.0, "best_test": 5.0}, (3000, 2e-3): {"best_val": 4.1, "best_test": 3.0}}
    assert tune.choose(points) == (3000, 1e-3)  # the lower test loss of 2e-3 must not decide
    tie = {(6000, 1e-3): {"best_val": 4.0}, (3000, 2e-3): {"best_val": 4.0}, (3000, 1e-3): {"best_val": 4.0}}
    assert tune.choose(tie) == (3000, 1e-3)  # tie: the shorter horizon, then the smaller LR
    assert tune.choose({}) is None


def test_out_dirs_and_commands_name_no_machine_path():
    cmd = tune.command("ptb", 2e-3, 3000, "cosine")
    assert tune.out_dir("wt2", 2e-3).name == "wt2_cos3000_lr2e-3"
    assert tune.lr_name(1.5e-3) == "1.5e-3" and tune.lr_name(1e-4) == "1e-4"
    text = " ".join(cmd[1:])
    assert "--schedule cosine" in text and "--lr 2e-3" in text and "--patience 0" in text
    # every path the command names is relative to the repository (records must name no machine's directories)
    paths = [a for a in cmd[1:] if "/" in a]
    assert paths and all(not Path(a).is_absolute() for a in paths), paths
