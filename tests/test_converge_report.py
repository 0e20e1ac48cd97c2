"""The converge-regime report math, the sweep grid, the dependency-aware run pool and the report section, on synthetic
metrics.jsonl files (no DeepSpeed launches): each number is checked against one computed by hand."""
from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import numpy as np
import pytest

from benchmarks import converge as cv
from benchmarks import launching
from benchmarks import paper_table as pt
from benchmarks import plots, store


def u_curve(best_step: int, best: float, slope: float = 1e-3):
    """A test loss that falls linearly to ``best`` at ``best_step`` and rises after it (overfitting)."""
    return lambda t: best + slope * abs(t - best_step)


def rows_of(steps: int, flops_per_step: float, test, eval_every: int = 10, active=lambda t: 1.0,
            seconds_per_step: float = 1.0) -> list[dict]:
    rows = []
    for t in range(1, steps + 1):
        r = {"trainer/step": t, "perf/flops_cumulative": flops_per_step * t,
             "perf/train_seconds_cumulative": seconds_per_step * t, "mat/active_fraction": active(t)}
        if t % eval_every == 0:
            r.update({"val/loss": test(t) + 0.2, "test/loss": test(t)})
        rows.append(r)
    return rows


def test_converge_metrics_by_hand():
    full = rows_of(100, 10.0, u_curve(50, 4.0))  # best 4.0 at step 50: FLOPs 500, seconds 50
    # cheaper steps, better best (3.9 at step 40), falling 0.01 per step before it
    other = rows_of(80, 8.0, u_curve(40, 3.9, slope=0.01), active=lambda t: 1.0 if t <= 20 else 0.5,
                    seconds_per_step=1.5)
    m = cv.converge_metrics(other, full)
    assert m["best_test"] == pytest.approx(3.9) and m["best_step"] == 40
    assert m["target"] == pytest.approx(4.0)
    # first evaluation with test <= 4.0: step 30 (3.9 + 0.01*10 = 4.0)
    assert m["reach_flops"] == pytest.approx(30 * 8.0 / 500.0)
    assert m["reach_seconds"] == pytest.approx(30 * 1.5 / 50.0)
    assert m["best_flops"] == pytest.approx(40 * 8.0 / 500.0)
    assert m["steps"] == 80 and m["past_best"] == pytest.approx((80 - 40) / 40)
    assert m["evals_after_best"] == 4  # evaluations at 50, 60, 70, 80
    assert m["active_q1"] == pytest.approx(1.0) and m["active_q2"] == pytest.approx(0.5)
    assert m["active"] == pytest.approx((20 + 60 * 0.5) / 80)
    # a run that never gets down to full's best
    worse = cv.converge_metrics(rows_of(60, 10.0, u_curve(30, 4.5)), full)
    assert math.isnan(worse["reach_flops"]) and math.isnan(worse["reach_seconds"])
    assert worse["best_test"] == pytest.approx(4.5)
    # full against itself: every ratio is 1
    same = cv.converge_metrics(full, full)
    assert same["reach_flops"] == pytest.approx(1.0) and same["best_flops"] == pytest.approx(1.0)


def test_converge_metrics_needs_test_losses():
    rows = [{"trainer/step": 1, "perf/flops_cumulative": 1.0, "val/loss": 5.0}]
    with pytest.raises(ValueError, match="test"):
        cv.converge_metrics(rows, rows)


def test_per_seed_uses_the_right_reference_and_sweep_grid():
    full = rows_of(100, 10.0, u_curve(50, 4.0))
    runs = {1: {"full": full, "mat_a0.3_b0.05": rows_of(100, 10.0, u_curve(50, 3.8)),
                "switch_full": rows_of(100, 20.0, u_curve(50, 3.0)),
                "switch_mat": rows_of(100, 20.0, u_curve(50, 2.9))},
            2: {"full": full, "mat_a0.3_b0.05": rows_of(100, 10.0, u_curve(50, 3.6))}}
    ps = cv.per_seed(runs)
    assert ps["switch_mat"][1]["target"] == pytest.approx(3.0)  # compared with switch_full, not full
    assert ps["mat_a0.3_b0.05"][2]["target"] == pytest.approx(4.0)
    grid = cv.sweep_grid(ps, "best_test")
    i, j = cv.SWEEP_ALPHAS.index(0.3), cv.SWEEP_BETAS.index(0.05)
    assert grid[i, j] == pytest.approx(3.7)  # mean over the two seeds
    assert np.isnan(grid).sum() == grid.size - 1
    name, agg, diff = cv.best_cell(ps)
    assert name == "mat_a0.3_b0.05" and diff.mean == pytest.approx(-0.3) and diff.n == 2
    assert ps["mat_a0.3_b0.05"][1]["d_best_test"] == pytest.approx(-0.2)
    # a cell run only on a seed where full itself did well has the lowest mean best test loss (3.5) but is worse
    # than full on that seed: the best cell is ranked by the paired difference, not by the mean
    lucky_full = rows_of(100, 10.0, u_curve(50, 3.0))
    ps["mat_a0.05_b0"] = {3: cv.converge_metrics(rows_of(100, 10.0, u_curve(50, 3.5)), lucky_full)}
    assert cv.best_cell(ps)[0] == "mat_a0.3_b0.05"
    # the default cell is read from the mat run (not trained twice as a sweep run)
    assert "mat_a0.1_b0.05" not in cv.sweep_methods() and cv.cell_method(0.1, 0.05) == "mat"
    ps["mat"] = {1: cv.converge_metrics(rows_of(100, 10.0, u_curve(50, 4.2)), full)}
    grid = cv.sweep_grid(ps, "best_test")
    assert grid[cv.SWEEP_ALPHAS.index(0.1), cv.SWEEP_BETAS.index(0.05)] == pytest.approx(4.2)


def test_method_blocks():
    s = cv.CONVERGE
    assert cv.method_block("mat_a0.05_b0.2", s, 3, Path("/nonexistent"))["alpha"] == 0.05
    assert cv.method_block("mat_floor", s, 3, Path("/x"))["min_active_fraction"] == 0.25
    assert cv.method_block("mat_layer", s, 3, Path("/x"))["threshold_scope"] == "layer"
    assert cv.method_block("mat_logit_sum", s, 3, Path("/x"))["probe_output"] == "logit_sum"
    assert cv.method_block("switch_full", s, 3, Path("/x")) == {"policy": "full"}
    from mat_ds.core.config import MATConfig

    controls = list(cv.SWEEP_CONTROLS)  # read another run's fraction: test_control_reads_its_own_cell
    for m in ["mat", "switch_mat", "multirate", *[m for m in cv.sweep_methods() if m not in controls]]:
        MATConfig.from_dict(cv.method_block(m, s, 1, Path("/x")))
    with pytest.raises(ValueError):
        cv.method_block("nope", s, 1, Path("/x"))



def test_rand_keeps_the_fraction_it_started_with(tmp_path):
    """rand trains at MAT's mean active fraction of the same seed; once started, a continued mat does not change it."""
    s = cv.CONVERGE
    mat = store.run_dir(tmp_path, 1, "mat")
    mat.mkdir(parents=True)
    rows = [{"trainer/step": t, "mat/active_fraction": 0.25} for t in range(s.mat_warmup + 1, s.mat_warmup + 11)]
    (mat / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    block = cv.method_block("rand", s, 1, tmp_path)
    assert block["rand_active_fraction"] == pytest.approx(0.25)
    rand = store.run_dir(tmp_path, 1, "rand")
    rand.mkdir(parents=True)
    (rand / "spec.json").write_text(json.dumps({"ds_config": {"mat": block}}))
    rows += [{"trainer/step": t, "mat/active_fraction": 0.0625} for t in range(s.mat_warmup + 11, s.mat_warmup + 31)]
    (mat / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))  # mat continued
    assert cv.method_block("rand", s, 1, tmp_path)["rand_active_fraction"] == pytest.approx(0.25)


def test_control_reads_its_own_cell(tmp_path):
    """rand_a0.05_b0 trains random heads at mat_a0.05_b0's fraction of the same seed (not mat's), after that run."""
    s = cv.CONVERGE
    for method, frac in (("mat", 0.0625), ("mat_a0.05_b0", 0.25)):
        d = store.run_dir(tmp_path, 2, method)
        d.mkdir(parents=True)
        rows = [{"trainer/step": t, "mat/active_fraction": frac} for t in range(s.mat_warmup + 1, s.mat_warmup + 11)]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cv.depends_on("rand_a0.05_b0") == ["mat_a0.05_b0"]
    block = cv.method_block("rand_a0.05_b0", s, 2, tmp_path)
    assert block["policy"] == "rand" and block["rand_active_fraction"] == pytest.approx(0.25) and block["seed"] == 2
    from mat_ds.core.config import MATConfig

    MATConfig.from_dict(block)
    # early stopping counts from the step of the cell's best (a control must not end on the plateau its cell left)
    cell = store.run_dir(tmp_path, 2, "mat_a0.05_b0")
    (cell / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows_of(100, 10.0, u_curve(70, 3.9))))
    assert cv.control_patience_from(tmp_path, 2, "rand_a0.05_b0") == 70
    ctrl = store.run_dir(tmp_path, 2, "rand_a0.05_b0")  # once started, its recorded value holds
    ctrl.mkdir(parents=True)
    (ctrl / "spec.json").write_text(json.dumps({"ds_config": {"mat": block}, "args": ["--patience_from", "40"]}))
    assert cv.control_patience_from(tmp_path, 2, "rand_a0.05_b0") == 40
    # rand, the default cell's control, counts from mat's best; one started without the flag (an earlier harness) gets it
    (store.run_dir(tmp_path, 2, "mat") / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows_of(100, 10.0, u_curve(30, 4.1))))
    rand = store.run_dir(tmp_path, 2, "rand")
    rand.mkdir(parents=True)
    (rand / "spec.json").write_text(json.dumps({"ds_config": {"mat": {}}, "args": ["--seed", "2"]}))
    assert cv.control_patience_from(tmp_path, 2, "rand") == 30
    # a control is not an α/β cell: it never becomes the "best cell" even when it has the lowest loss
    full = rows_of(100, 10.0, u_curve(50, 4.0))
    ps = {"mat_a0.05_b0": {2: cv.converge_metrics(rows_of(100, 10.0, u_curve(50, 3.9)), full)},
          "rand_a0.05_b0": {2: cv.converge_metrics(rows_of(100, 10.0, u_curve(50, 3.8)), full)}}
    assert cv.best_cell(ps)[0] == "mat_a0.05_b0"


def test_raptr_keeps_the_schedule_it_started_with(tmp_path):
    """raptr's stages are thirds of full's length; once raptr started, a full continued under a larger cap keeps them."""
    s = cv.CONVERGE
    full = store.run_dir(tmp_path, 1, "full")
    full.mkdir(parents=True)
    (full / "metrics.jsonl").write_text("".join(json.dumps({"trainer/step": t}) + "\n" for t in (3000, 6000)))
    block = cv.method_block("raptr", s, 1, tmp_path)
    assert block["raptr_schedule"] == pt.raptr_schedule(s.n_layer, 6000)
    raptr = store.run_dir(tmp_path, 1, "raptr")
    raptr.mkdir(parents=True)
    (raptr / "spec.json").write_text(json.dumps({"ds_config": {"mat": block}}))
    (full / "metrics.jsonl").write_text("".join(json.dumps({"trainer/step": t}) + "\n" for t in (3000, 6000, 9000)))
    assert cv.method_block("raptr", s, 1, tmp_path) == block


def test_run_pool_respects_dependencies_jobs_and_failures():
    order, live, peak, lock = [], [0], [0], threading.Lock()
    finished: set = set()

    def run_one(seed, method):
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
        threading.Event().wait(0.05)
        with lock:
            live[0] -= 1
            order.append((seed, method))
        if (seed, method) == (2, "mat"):
            raise RuntimeError("boom")
        finished.add((seed, method))

    tasks = [(s, m) for m in ("full", "mat", "rand", "raptr") for s in (1, 2)]
    errors = cv.run_pool(tasks, run_one, lambda s, m: (s, m) in finished, jobs=2)
    assert peak[0] == 2
    assert order.index((1, "rand")) > order.index((1, "mat"))
    assert order.index((1, "raptr")) > order.index((1, "full"))
    assert (2, "rand") not in order  # its mat failed: skipped, reported
    assert any("seed 2 mat: boom" in e for e in errors) and any("seed 2 rand: skipped" in e for e in errors)


def write_finished_runs(out: Path) -> None:
    """Two seeds of finished full and mat runs (mat 0.11 / 0.12 better at its best), as the harness leaves them."""
    for seed in (1, 2):
        for method, best in (("full", 4.0), ("mat", 3.9 - 0.01 * seed)):
            d = store.run_dir(out, seed, method)
            d.mkdir(parents=True)
            rows = rows_of(100, 10.0, u_curve(50, best), active=lambda t: 1.0 if method == "full" else 0.6)
            (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            (d / "done.json").write_text(json.dumps({"launch_seconds": 60.0}))


def test_write_section_replaces_only_its_block(tmp_path):
    out = tmp_path / "runs"
    write_finished_runs(out)
    d = store.run_dir(out, 1, "mat_floor")  # one option run, one seed
    d.mkdir(parents=True)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows_of(100, 10.0, u_curve(50, 3.95))))
    (d / "done.json").write_text(json.dumps({"launch_seconds": 60.0}))
    d = store.run_dir(out, 1, "rand")  # interrupted: metrics but no done.json
    d.mkdir(parents=True)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows_of(40, 10.0, u_curve(50, 4.2))))
    results = tmp_path / "docs" / "results.md"
    results.parent.mkdir()
    results.write_text("# Results\n\nshort-run table\n\n## Discussion\n\nhuman text\n")
    meta = {"scale": {"n_layer": 4}, "commands": ["python -m benchmarks.paper_table --converge"], "patience": 6,
            "machine": {"cpu_count": 2}}
    cv.write_section(results, out, meta, [1, 2])
    text = results.read_text()
    assert text.index("short-run table") < text.index(cv.MARK_BEGIN) < text.index("## Discussion")
    assert "human text" in text and "| mat (full) | 2 | 3.885 ± 0.007 | -0.115 ± 0.007 |" in text
    assert "| rand | 1 | 40 | 4.210 | 40 | 4.210 |" in text and "| rand (full)" not in text
    assert "### α/β landscape" in text and "| mat_floor (full) | 1 | 3.950" in text
    assert "`mat_floor` vs `full`: best test loss 0.050 lower (better) (one seed" in text
    # 4 table runs (of 7 methods x 2 seeds) of 100 steps x 10 FLOPs at 1 s/step: 4000 FLOPs, 400 s
    assert "- the methods table so far (4 of its 14 runs) is 0.00 PFLOP (probe included), 0.1 h of training-loop time" in text
    assert (results.parent / "converge_sweep_best_test.png").stat().st_size > 0
    cv.write_section(results, out, meta, [1, 2])  # idempotent: one block
    assert results.read_text().count(cv.MARK_BEGIN) == 1
    assert (results.parent / "converge_test_vs_flops.png").stat().st_size > 0


def test_longer_cap_extends_a_finished_run_and_pruning_keeps_latest(tmp_path):
    old = {"ds_config": {"a": 1}, "args": ["--seed", "1", "--train_steps", "5000", "--patience", "6"], "num_gpus": 1}
    longer = {**old, "args": ["--seed", "1", "--train_steps", "8000", "--patience", "6"]}
    shorter = {**old, "args": ["--seed", "1", "--train_steps", "4000", "--patience", "6"]}
    later = {**old, "args": [*old["args"], "--patience_from", "3000"]}
    other = {**longer, "ds_config": {"a": 2}}
    assert launching.continues(old, longer) and launching.continues(old, later)
    assert not launching.continues(old, shorter) and not launching.continues(old, other)
    assert not launching.continues(old, old) and not launching.continues(later, old)
    rows = [{"trainer/step": s, "test/loss": v} for s, v in ((1000, 5.0), (2000, 4.0), (2500, 4.1), (4300, 4.2))]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # ended by early stopping (4300 < 5000), best at 2000: a longer cap would not change it, patience counted only
    # from 3000 would have let it go on
    (tmp_path / "done.json").write_text(json.dumps({"steps": 4300}))
    assert launching.stop_is_final(tmp_path, old, longer)
    assert not launching.stop_is_final(tmp_path, old, later)
    assert launching.stop_is_final(tmp_path, old, {**old, "args": [*old["args"], "--patience_from", "2000"]})
    # ended by its cap: a longer cap continues it, a later patience_from alone does not
    (tmp_path / "done.json").write_text(json.dumps({"steps": 5000}))
    assert not launching.stop_is_final(tmp_path, old, longer)
    assert launching.stop_is_final(tmp_path, old, later)
    ck = tmp_path / "checkpoints"
    for tag in ("global_step500", "global_step1000"):
        (ck / tag).mkdir(parents=True)
    (ck / "latest").write_text("global_step1000")
    launching.prune_checkpoints(ck)
    assert sorted(p.name for p in ck.iterdir()) == ["global_step1000", "latest"]


def test_compute_budget_by_hand():
    # three table runs: 1, 4 and 9 GFLOP/s (median 4, mean 4.67), 1.1e12 FLOPs and 100 + 25 + 100 s in all
    runs = {1: {"full": rows_of(100, 1e9, u_curve(50, 4.0)),
                "mat": rows_of(50, 2e9, u_curve(25, 4.0), seconds_per_step=0.5),
                "mat_floor": rows_of(100, 1e12, u_curve(50, 4.0))},  # not asked for: not counted
            2: {"rand": rows_of(100, 9e9, u_curve(50, 4.0))}}
    b = cv.compute_budget(runs, ["full", "mat", "rand"], cores=2, target_hours=1.0)
    assert b["runs"] == 3 and b["flops"] == pytest.approx(1e11 + 1e11 + 9e11)
    assert b["train_hours"] == pytest.approx(225 / 3600)
    assert b["gflops_per_run"] == pytest.approx(4.0)
    assert b["needed_gflops_per_core"] == pytest.approx(1.1e12 / (2 * 3600) / 1e9)
    assert b["floor_hours"] == pytest.approx(1.1e12 / (2 * 4e9) / 3600)
    assert cv.compute_budget({}, ["full"], cores=2)["runs"] == 0


def test_budget_line_says_when_the_table_is_incomplete():
    meta = {"machine": {"cpu_count": 2}}
    one_seed = {1: {m: rows_of(100, 1e9, u_curve(50, 4.0)) for m in cv.TABLE_METHODS}}
    assert cv._budget_line(one_seed, meta, [1])[0].startswith(f"- the methods table ({len(cv.TABLE_METHODS)} runs) is")
    # the same runs read against two seeds: half the table is missing, and the line says so
    assert cv._budget_line(one_seed, meta, [1, 2])[0].startswith(
        f"- the methods table so far ({len(cv.TABLE_METHODS)} of its {2 * len(cv.TABLE_METHODS)} runs) is")
    assert cv._budget_line(one_seed, {}, [1]) == []  # no core count recorded: no floor guessed


def test_records_alone_redraw_the_same_report(tmp_path):
    """A fresh clone has only the committed records (metrics.jsonl.gz, done.json): the report must read the same rows
    from them as from the live files, and writing a record twice must give the same bytes (no git churn)."""
    out = tmp_path / "runs"
    write_finished_runs(out)
    meta = {"scale": {"n_layer": 4}, "commands": ["python -m benchmarks.paper_table --converge"], "patience": 6,
            "machine": {"cpu_count": 2}}
    live = cv.load(out, [1, 2], ["full", "mat"])
    first = store.write_record(store.run_dir(out, 1, "mat")).read_bytes()
    assert store.write_record(store.run_dir(out, 1, "mat")).read_bytes() == first
    live_doc = tmp_path / "live.md"
    cv.write_section(live_doc, out, meta, [1, 2])
    for d in out.glob("seed*/*"):
        store.write_record(d)
        (d / "metrics.jsonl").unlink()
    assert all(store.is_complete(d) for d in out.glob("seed*/*"))
    assert cv.load(out, [1, 2], ["full", "mat"]) == live
    record_doc = tmp_path / "record.md"
    cv.write_section(record_doc, out, meta, [1, 2])
    assert record_doc.read_text() == live_doc.read_text()
    # the harness skips a finished run it finds only as a record (same spec): nothing is launched again
    d = store.run_dir(out, 1, "full")
    (d / "spec.json").write_text(json.dumps({"ds_config": {"mat": None}, "args": ["--seed", "1"], "num_gpus": 1}))
    assert launching.ensure_run(out, 1, "full", {"mat": None}, ["--seed", "1"], 1) == live[1]["full"]
    assert not (d / "launch.log").exists()
    # a record without done.json (a run killed after a record of an earlier finish) does not count as complete
    (store.run_dir(out, 2, "mat") / "done.json").unlink()
    assert not store.is_complete(store.run_dir(out, 2, "mat"))


def test_paths_beside_the_repository_stay_relative_through_symbolic_links(tmp_path):
    """``../shared`` as a symbolic link (a normal checkout layout): the path keeps naming the link, never its target,
    also when the target's absolute path is what was given; a path elsewhere stays absolute."""
    repo, real = tmp_path / "work" / "main", tmp_path / "elsewhere" / "shared"
    (real / "data").mkdir(parents=True)
    repo.mkdir(parents=True)
    (real / "data" / "test.txt").write_text("x\n")
    (repo.parent / "shared").symlink_to(real, target_is_directory=True)
    via_link = repo.parent / "shared" / "data" / "test.txt"
    assert store.repo_relative(via_link, repo) == "../shared/data/test.txt"
    assert store.repo_relative(real / "data" / "test.txt", repo) == "../shared/data/test.txt"
    assert store.repo_relative(repo / "runs" / "x", repo) == "runs/x"
    assert store.repo_relative(tmp_path / "other" / "y", repo) == str(tmp_path / "other" / "y")


def test_records_name_no_machine_paths(tmp_path):
    """Specs, logs and harness.json are committed: paths in and beside the repository are written relative to it (the
    runs are launched from it), so a clone in another directory matches the specs and its records name no machine."""
    assert store.repo_relative(store.REPO / "runs" / "x.txt") == "runs/x.txt"
    assert store.repo_relative(store.REPO.parent / "shared" / "test.txt") == "../shared/test.txt"
    if not Path("/").joinpath("nowhere").resolve().is_relative_to(store.REPO.parent):
        assert store.repo_relative("/nowhere/x.txt") == "/nowhere/x.txt"  # elsewhere: absolute, as given
    assert pt._resolve_data(str(store.REPO / "README.md"), store.REPO, "train data") == "README.md"
    d = tmp_path / "run"
    d.mkdir()
    (d / "metrics.jsonl").write_text(json.dumps({"trainer/step": 1}) + "\n")
    (d / "launch.log").write_text(f"{store.REPO}/.venv/bin/python3 -u launch/pretrain.py --test_data "
                                  f"{store.REPO.parent}/shared/test.txt\n")
    store.write_record(d)
    assert (d / "launch.log").read_text() == ".venv/bin/python3 -u launch/pretrain.py --test_data ../shared/test.txt\n"
