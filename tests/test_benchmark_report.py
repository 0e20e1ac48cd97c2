"""The paper-table report math and plots on synthetic metrics.jsonl files (no DeepSpeed launches).

The harness's conclusions ("MAT needs 0.55× the FLOPs", "not reached") are only as good as the interpolation, the
reach detection and the seed aggregation, so each is checked against numbers computed by hand here.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from benchmarks import paper_table as pt
from benchmarks import plots, store
from mat_ds.core.config import MATConfig


def write_run(out: Path, seed: int, method: str, steps: int, flops_per_step: float, seconds_per_step: float,
              val, eval_every: int = 10, active: float = 1.0, overhead: float = 0.0, extra=None,
              done: bool = True) -> Path:
    """A metrics.jsonl in the trainer's format: one row per step, val/test on eval steps, final full-test row."""
    d = store.run_dir(out, seed, method)
    d.mkdir(parents=True, exist_ok=True)
    rows = []
    for t in range(1, steps + 1):
        row = {"trainer/step": t, "train/loss": 7.0, "perf/flops_cumulative": flops_per_step * t,
               "perf/train_seconds_cumulative": seconds_per_step * t, "mat/active_fraction": active,
               "mat/refresh_share": overhead}
        if t % eval_every == 0 or t == steps:
            row["val/loss"] = val(t)
            row["test/loss"] = val(t) - 0.1
        row.update((extra or {}).get(t, {}))
        rows.append(row)
    rows.append({"trainer/step": steps, "test/loss_final": val(steps) - 0.05})
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if done:
        (d / "done.json").write_text(json.dumps({"rc": 0, "launch_seconds": 1.0, "loadavg_1min_before": 0.5}))
    return d


def linear_val(start: float, slope: float):
    return lambda t: start - slope * t


# -- interpolation and reach ------------------------------------------------------------------------------------------
def test_interp_at_inside_ends_and_outside():
    xs, ys = np.array([10.0, 20.0, 30.0]), np.array([5.0, 4.0, 2.0])
    assert pt.interp_at(xs, ys, 15.0) == pytest.approx(4.5)
    assert pt.interp_at(xs, ys, 25.0) == pytest.approx(3.0)
    assert pt.interp_at(xs, ys, 30.0) == pytest.approx(2.0)
    assert pt.interp_at(xs, ys, 30.0 * (1 + 1e-12)) == pytest.approx(2.0)  # float slack at the budget itself
    assert math.isnan(pt.interp_at(xs, ys, 31.0))  # never got that far
    assert math.isnan(pt.interp_at(xs, ys, 5.0))  # not evaluated that early
    assert math.isnan(pt.interp_at(np.array([]), np.array([]), 1.0))


def test_first_reach():
    val = np.array([5.0, 4.0, 3.0, 3.5, 2.9])
    assert pt.first_reach(val, 3.0) == 2
    assert pt.first_reach(val, 2.9) == 4
    assert pt.first_reach(val, 2.0) is None


def test_read_rows_merges_final_test_row_and_skips_truncated_line(tmp_path):
    d = write_run(tmp_path, 1, "full", 20, 1.0, 1.0, linear_val(6, 0.1))
    with open(d / "metrics.jsonl", "a") as fh:
        fh.write('{"trainer/step": 21, "train/lo')  # killed mid-write
    rows = store.read_rows(d / "metrics.jsonl")
    assert [r["trainer/step"] for r in rows] == list(range(1, 21))
    assert rows[-1]["test/loss_final"] == pytest.approx(6 - 2.0 - 0.05) and rows[-1]["val/loss"] == pytest.approx(4.0)


# -- per-run metrics --------------------------------------------------------------------------------------------------
def test_full_against_itself(tmp_path):
    full = store.read_rows(write_run(tmp_path, 1, "full", 30, 2.0, 0.5, linear_val(6, 0.1)) / "metrics.jsonl")
    m = pt.run_metrics(full, full)
    assert m["budget"] == 60.0 and m["target"] == pytest.approx(3.0)
    assert m["val@1/3"] == pytest.approx(5.0) and m["val@2/3"] == pytest.approx(4.0) and m["val@3/3"] == pytest.approx(3.0)
    assert m["reach_flops"] == 1.0 and m["reach_seconds"] == 1.0 and m["reach_step"] == 30
    assert m["flops_per_step"] == pytest.approx(1.0) and m["seconds_per_step"] == pytest.approx(1.0)
    assert m["best_test"] == pytest.approx(2.9) and m["test_final"] == pytest.approx(2.95)


def test_cheaper_faster_method_ratios(tmp_path):
    """Half the FLOPs per step, 0.8× the seconds, and twice the per-step progress: reaches full's best (3.0 at step
    30, 60 FLOPs) at step 15 = 15 FLOPs, 0.25× full; 0.2× full's seconds."""
    full = store.read_rows(write_run(tmp_path, 1, "full", 30, 2.0, 0.5, linear_val(6, 0.1)) / "metrics.jsonl")
    fast = store.read_rows(write_run(tmp_path, 1, "mat", 60, 1.0, 0.4, linear_val(6, 0.2), eval_every=5,
                                     active=0.5, overhead=0.03) / "metrics.jsonl")
    m = pt.run_metrics(fast, full)
    assert m["reach_step"] == 15
    assert m["reach_flops"] == pytest.approx(15 / 60) and m["reach_seconds"] == pytest.approx(0.4 * 15 / 15.0)
    assert m["val@1/3"] == pytest.approx(6 - 0.2 * 20)  # F/3 = 20 FLOPs = step 20
    assert m["val@3/3"] == pytest.approx(6 - 0.2 * 60)
    assert m["flops_per_step"] == pytest.approx(0.5) and m["seconds_per_step"] == pytest.approx(0.8)
    assert m["overhead"] == 0.03 and m["active"] == 0.5


def test_not_reached_and_short_run(tmp_path):
    full = store.read_rows(write_run(tmp_path, 1, "full", 30, 2.0, 0.5, linear_val(6, 0.1)) / "metrics.jsonl")
    # slower learner, capped before the budget: never reaches 3.0, never gets to F
    slow = store.read_rows(write_run(tmp_path, 1, "rand", 40, 1.0, 0.5, linear_val(6, 0.05)) / "metrics.jsonl")
    m = pt.run_metrics(slow, full)
    assert math.isnan(m["reach_flops"]) and math.isnan(m["reach_seconds"])
    assert math.isnan(m["val@3/3"]) and m["val@2/3"] == pytest.approx(6 - 0.05 * 40)


# -- aggregation and the table ----------------------------------------------------------------------------------------
def test_agg_mean_std_and_missing():
    a = pt.Agg.of([1.0, 2.0, 3.0])
    assert (a.mean, a.std, a.n, a.total) == (2.0, pytest.approx(1.0), 3, 3)
    assert a.fmt(2) == "2.00 ± 1.00"
    b = pt.Agg.of([0.5, float("nan")])
    assert (b.mean, b.std, b.n) == (0.5, 0.0, 1) and b.fmt(2) == "0.50 (1/2)"  # one value: no spread to show
    c = pt.Agg.of([float("nan"), float("nan")])
    assert c.n == 0 and c.fmt(missing="not reached") == "not reached"
    assert pt.Agg.of([0.031, 0.029]).fmt(1, pct=True) == "3.0 ± 0.1%"


def synthetic_benchmark(out: Path, seeds=(1, 2, 3), mat_reaches=(True, True, False)) -> None:
    """full, and a MAT that is 20% cheaper per step and learns as fast on seeds where it reaches."""
    for seed, reach in zip(seeds, mat_reaches):
        write_run(out, seed, "full", 30, 2.0, 0.5, linear_val(6 + 0.01 * seed, 0.1))
        write_run(out, seed, "mat", 38, 1.6, 0.45, linear_val(6 + 0.01 * seed, 0.1 if reach else 0.05),
                  active=0.7, overhead=0.04)
        write_run(out, seed, "rand", 38, 1.6, 0.45, linear_val(6 + 0.01 * seed, 0.06), active=0.7)


def test_summary_over_seeds_and_paired_diff(tmp_path):
    synthetic_benchmark(tmp_path)
    per_seed = pt.per_seed_metrics(store.load_runs(tmp_path))
    summary = pt.summarize(per_seed)
    rf = summary["mat"]["reach_flops"]
    assert rf.n == 2 and rf.total == 3 and rf.mean == pytest.approx(30 * 1.6 / 60)  # reached at step 30
    assert summary["full"]["reach_flops"].mean == 1.0 and summary["full"]["reach_flops"].std == 0.0
    d = pt.paired_diff(per_seed, "mat", "rand", "val@2/3")
    assert d.n == 3 and d.mean < 0
    table = pt.markdown_table(summary)
    assert "| mat |" in table and "(2/3)" in table and "| full |" in table
    text = "\n".join(pt.commentary(per_seed, summary, {"scale": dataclasses_scale()}, [0.5]))
    assert "**Target not met** (FLOPs" in text and "only 2 of 3 seeds" in text  # not reached on seed 3
    assert "**Overhead target met**" in text


def dataclasses_scale() -> dict:
    import dataclasses

    return dataclasses.asdict(pt.SMALL)


def test_load_runs_ignores_incomplete(tmp_path):
    write_run(tmp_path, 1, "full", 30, 2.0, 0.5, linear_val(6, 0.1))
    write_run(tmp_path, 1, "mat", 30, 2.0, 0.5, linear_val(6, 0.1), done=False)
    assert list(store.load_runs(tmp_path)[1]) == ["full"]
    assert list(store.load_runs(tmp_path, complete_only=False)[1]) == ["full", "mat"]


# -- configs the harness generates ------------------------------------------------------------------------------------
def test_raptr_schedule_and_scaling():
    assert pt.raptr_schedule(4, 300) == [[0, 2], [100, 3], [200, 4]]
    assert pt.raptr_schedule(6, 90) == [[0, 3], [30, 4], [60, 6]]
    assert pt.raptr_schedule(12, 6000) == [[0, 6], [2000, 8], [4000, 12]]
    small = pt.SMALL.with_steps(36)
    assert small.steps == 36 and small.eval_interval == max(1, round(24 * 36 / 360)) and small.refresh_interval >= 1


@pytest.mark.parametrize("scale", [pt.SMALL, pt.FULL, pt.SMALL.with_steps(30)], ids=["small", "full", "smoke"])
@pytest.mark.parametrize("method", pt.METHODS)
def test_generated_mat_blocks_are_valid(method, scale):
    """Every block the harness writes passes the trainer's own validation (a typo would fail only at launch)."""
    block = pt.mat_block(method, scale, seed=2, full_steps=scale.steps, rand_fraction=0.62)
    cfg = pt.ds_config(block, scale)
    mat = MATConfig.from_dict(cfg["mat"])
    mat.check_model(scale.n_layer)
    assert mat.policy == method
    assert cfg["scheduler"]["type"] == "WarmupLR" and cfg["scheduler"]["params"]["warmup_max_lr"] == cfg["optimizer"]["params"]["lr"]


def test_rand_fraction_from_mat_rows():
    rows = [{"trainer/step": t, "mat/active_fraction": 1.0 if t <= 50 else (0.5 if t % 2 else 0.75)}
            for t in range(1, 101)]
    assert pt.mat_active_fraction(rows, 50) == pytest.approx(0.625)
    assert pt.mat_active_fraction(rows[:10], 50) == 1.0


# -- plots and the whole report ---------------------------------------------------------------------------------------
def lambda_rows_extra(n_refresh: int, refresh: int, block: dict, L: int = 2, H: int = 2) -> dict:
    """λmax rows as the trainer logs them (in the row of refresh_step + 1), with frozen counts from the real policy."""
    import torch

    from mat_ds.core.policy import make_policy

    policy = make_policy(MATConfig.from_dict(block), L * H, L)
    rng = np.random.default_rng(0)
    extra = {}
    for j in range(n_refresh):
        step = j * refresh
        lam = torch.tensor(rng.uniform(0.01, 1.0, size=(L, H)) / (1 + j), dtype=torch.float32)
        frozen = policy.update(step, lam.flatten().double())
        extra[step + 1] = {f"mat/lambda_max/L{l}H{h}": float(lam[l, h]) for l in range(L) for h in range(H)}
        extra[step + 1]["mat/frozen_heads"] = int(frozen.sum())
    return extra


def test_lambda_heatmap_replays_frozen_set(tmp_path):
    block = {"policy": "mat", "alpha": 0.3, "beta": 0.05, "warmup_steps": 10, "refresh_interval": 5}
    d = write_run(tmp_path, 1, "mat", 30, 1.0, 1.0, linear_val(6, 0.1), extra=lambda_rows_extra(6, 5, block))
    rows = store.read_rows(d / "metrics.jsonl")
    labels, steps, lam = plots.lambda_matrix(rows)
    assert labels == ["L0H0", "L0H1", "L1H0", "L1H1"] and list(steps) == [0, 5, 10, 15, 20, 25]
    frozen = plots.replay_frozen(rows, block, labels, steps, lam)
    assert frozen is not None and not frozen[:, :2].any() and frozen[:, 2:].any()
    bad = [dict(r, **{"mat/frozen_heads": 99}) if "mat/frozen_heads" in r else r for r in rows]
    assert plots.replay_frozen(bad, block, labels, steps, lam) is None  # disagreement: no marks rather than wrong ones
    assert plots.plot_lambda_heatmap(rows, tmp_path / "h.png", block).stat().st_size > 1000


def test_report_only_writes_results_and_plots(tmp_path, capsys):
    out = tmp_path / "runs"
    synthetic_benchmark(out)
    block = {"policy": "mat", "alpha": 0.3, "beta": 0.05, "warmup_steps": 10, "refresh_interval": 5}
    write_run(out, 1, "mat", 38, 1.6, 0.45, linear_val(6.01, 0.1), active=0.7, overhead=0.04,
              extra=lambda_rows_extra(7, 5, block))
    (store.run_dir(out, 1, "mat") / "ds_config.json").write_text(json.dumps({"mat": block}))
    (out / "harness.json").write_text(json.dumps({
        "command": "python benchmarks/paper_table.py --seeds 1 2 3", "scale": dataclasses_scale(),
        "seeds": [1, 2, 3], "methods": ["full", "mat", "rand"], "train_data": "x", "test_data": "y",
        "machine": {"cpu_count": 2}}))
    results = tmp_path / "docs" / "results.md"
    assert pt.main(["--report_only", "--out", str(out), "--results", str(results)]) == 0
    text = results.read_text()
    for png in ("val_loss_vs_flops.png", "mat_lambda_heatmap.png", "active_fraction.png"):
        assert (results.parent / png).stat().st_size > 1000 and f"]({png})" in text
    assert "python benchmarks/paper_table.py --seeds 1 2 3" in text and "## Discussion" in text
    assert "| mat |" in capsys.readouterr().out


def test_missing_default_data_is_one_line_error(tmp_path):
    with pytest.raises(SystemExit) as exc:
        pt.main(["--train_data", str(tmp_path / "nope.txt"), "--out", str(tmp_path)])
    assert str(exc.value).startswith("error: train data") and "\n" not in str(exc.value)


def test_regenerating_keeps_the_human_discussion(tmp_path):
    results = tmp_path / "results.md"
    assert "Placeholder" in pt._kept_discussion(results)
    results.write_text("# x\n\n## What the numbers say\n- a\n\n## Discussion\n\nMAT lost here because of B.\n")
    assert pt._kept_discussion(results) == "MAT lost here because of B.\n"
