"""Does MAT train faster and perform better here? The paper's Table 1, side by side on one code path.

    python -m benchmarks.paper_table                       # small scale: 5 methods x 3 seeds, <= 30 min on 2 CPU cores
    python -m benchmarks.paper_table --full                # GPU scale (12L d768 12h BERT)
    python -m benchmarks.paper_table --report_only         # recompute docs/results.md + plots from existing runs
    python -m benchmarks.paper_table --converge            # convergence regime: train past the best test loss
    python -m benchmarks.paper_table --converge --sweep    # its α/β landscape and options (benchmarks/converge.py)

(from the repository root; ``python benchmarks/paper_table.py`` works too).

Every run is one launch of the real launcher (``deepspeed ... launch/pretrain.py``) with the same model, data and seed
set; only the ``"mat"`` block of the DeepSpeed JSON differs. Per seed, ``full`` runs first: its final cumulative FLOPs
is the budget F for every other method (``--flops_budget F``, capped at 3N steps) and its step count N sets RaPTr's
stages. ``mat`` runs next, because ``rand`` trains random heads at the active fraction MAT chose (the paper's
MAT-Rand control), then ``multirate`` and ``raptr``. The LR is constant after a short warm-up so that runs of different
lengths are comparable at equal FLOPs.

Reported per method (mean ± std over seeds; ratios are per seed, then averaged): validation loss at F/3, 2F/3, F
(linear interpolation of the validation curve in cumulative FLOPs), best test loss, FLOPs and training wall-clock to
reach that seed's best ``full`` validation loss as ratios to ``full``'s, FLOPs and seconds per step relative to
``full``, MAT's overhead (probe + policy seconds / training seconds) and the mean active fraction of heads.

Runs whose ``done.json`` exists and whose launch spec is unchanged are skipped, so an interrupted harness resumes.
The report math (``run_metrics``, ``summarize``) is pure and unit-tested in ``tests/test_benchmark_report.py``.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as _dt
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

try:  # python -m benchmarks.paper_table (from the repository root), or imported (tests)
    from benchmarks import methods, plots, store
    from benchmarks.launching import ensure_run
except ImportError:  # python benchmarks/paper_table.py: this directory is sys.path[0], the repository root is not
    import methods  # type: ignore[no-redef]
    import plots  # type: ignore[no-redef]
    import store  # type: ignore[no-redef]
    from launching import ensure_run  # type: ignore[no-redef]
METHODS, REPO, RunSet, eval_curve, is_complete, load_runs, read_rows, run_dir = (
    store.METHODS, store.REPO, store.RunSet, store.eval_curve, store.is_complete, store.load_runs, store.read_rows,
    store.run_dir)

DEFAULT_TRAIN = REPO.parent / "shared" / "data" / "wikitext-2" / "valid.txt"
DEFAULT_TEST = REPO.parent / "shared" / "data" / "wikitext-2" / "test.txt"
BASE_CONFIG = REPO / "configs" / "bert_mat_zero2.json"


@dataclass(frozen=True)
class Scale:
    """Model, budget and policy settings of one benchmark scale. Step-denominated fields scale with ``steps``."""

    name: str
    n_layer: int
    n_head: int
    d_model: int
    seq_len: int
    vocab_size: int
    micro_batch: int
    lr: float
    lr_warmup: int  # WarmupLR steps, then constant
    steps: int  # N: full's step count; F = full's FLOPs after N steps
    eval_interval: int
    eval_batches: int
    mat_warmup: int
    refresh_interval: int
    alpha: float = 0.1
    beta: float = 0.05
    probe_samples: int = 16
    save_interval: int = 0  # 0 = one checkpoint at the end (deleted after the run unless --keep_checkpoints)
    num_gpus: Optional[int] = 2  # None = every visible GPU
    # "constant": WarmupLR (linear warm-up, then constant), so runs stopped at different steps compare at equal FLOPs;
    # "cosine": WarmupCosineLR, linear warm-up then a cosine decay to COSINE_MIN_RATIO of the peak at ``steps`` (a
    # fixed horizon every method shares: the tuned baseline of "No Train No Gain", Kaddour et al. 2023)
    schedule: str = "constant"

    def with_steps(self, steps: int) -> "Scale":
        """Same scale with N = ``steps``; evaluation, warm-ups and refreshes keep their share of the run."""
        f = steps / self.steps
        r = lambda v: max(1, round(v * f))  # noqa: E731
        return dataclasses.replace(self, steps=steps, eval_interval=r(self.eval_interval), lr_warmup=r(self.lr_warmup),
                                   mat_warmup=r(self.mat_warmup), refresh_interval=r(self.refresh_interval),
                                   save_interval=0 if not self.save_interval else r(self.save_interval))

    def model_flags(self) -> list[str]:
        return ["--arch", "bert", "--n_layer", str(self.n_layer), "--n_head", str(self.n_head),
                "--d_model", str(self.d_model), "--seq_len", str(self.seq_len), "--vocab_size", str(self.vocab_size)]


# Measured on 2 CPU cores (gloo, 2 ranks, shared machine): 0.16-0.20 s/step and ~28 s outside the training loop per
# run, 85-101 s per run at N=360, 7 min 52 s per seed of 5 methods, so 3 seeds ~24 min (benchmarks/README.md).
# lr 3e-3 was worse than 1e-3 at this budget (val 6.85 vs 6.66 after 360 steps).
SMALL = Scale("small", n_layer=4, n_head=4, d_model=128, seq_len=128, vocab_size=4096, micro_batch=8, lr=1e-3,
              lr_warmup=30, steps=360, eval_interval=24, eval_batches=4, mat_warmup=50, refresh_interval=25)
# BERT-base shape for one or more GPUs (fp32 as the repo's configs). Not sized for, or run on, the CPU machine.
FULL = Scale("full", n_layer=12, n_head=12, d_model=768, seq_len=128, vocab_size=8192, micro_batch=32, lr=3e-4,
             lr_warmup=300, steps=6000, eval_interval=400, eval_batches=20, mat_warmup=300, refresh_interval=100,
             probe_samples=32, save_interval=1000, num_gpus=None)


# ----------------------------------------------------------------------------------------------------------------------
# DeepSpeed configs per method
# ----------------------------------------------------------------------------------------------------------------------
def raptr_schedule(n_layer: int, steps: int) -> list[list[int]]:
    """Path length ~L/2, then ~2L/3, then L, in thirds of full's step count (4 layers: 2-3-4; 6: 3-4-6; 12: 6-8-12)."""
    lengths = [max(2, (n_layer + 1) // 2), max(2, (2 * n_layer + 2) // 3), n_layer]
    lengths = [min(max(v, 2), n_layer) if n_layer >= 2 else n_layer for v in lengths]
    schedule: list[list[int]] = []
    for start, length in zip((0, steps // 3, 2 * steps // 3), lengths):
        if schedule and start <= schedule[-1][0]:
            schedule[-1][1] = length  # tiny N: stages collapse
        else:
            schedule.append([start, length])
    return schedule


def mat_block(method: str, scale: Scale, seed: int, full_steps: int, rand_fraction: Optional[float]) -> dict:
    """The ``"mat"`` block per method, from the method table (``benchmarks/methods.py``)."""
    derived = {"rand_fraction": rand_fraction}
    if "raptr_schedule" in methods.needs(method):
        derived["raptr_schedule"] = raptr_schedule(scale.n_layer, full_steps)
    return methods.block(method, scale, seed, **derived)


SCHEDULES = ("constant", "cosine")
COSINE_MIN_RATIO = 0.01  # the cosine schedule ends at 1 % of the peak LR ("towards ~0")


def ds_config(block: dict, scale: Scale) -> dict:
    """configs/bert_mat_zero2.json with a constant-after-warm-up LR (WarmupLR) and the method's ``"mat"`` block."""
    cfg = json.loads(BASE_CONFIG.read_text())
    cfg["train_micro_batch_size_per_gpu"] = scale.micro_batch
    cfg["optimizer"]["params"]["lr"] = scale.lr
    if scale.schedule == "cosine":
        cfg["scheduler"] = {"type": "WarmupCosineLR", "params": {
            "total_num_steps": scale.steps, "warmup_num_steps": scale.lr_warmup, "warmup_type": "linear",
            "warmup_min_ratio": 0.0, "cos_min_ratio": COSINE_MIN_RATIO}}
    else:
        cfg["scheduler"] = {"type": "WarmupLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": scale.lr,
                                                           "warmup_num_steps": scale.lr_warmup}}
    cfg["mat"] = copy.deepcopy(block)
    return cfg


def mat_active_fraction(rows: list[dict], warmup_steps: int) -> float:
    """MAT's mean active fraction over the steps after warm-up (row t = the step that ran as index t-1)."""
    vals = [r["mat/active_fraction"] for r in rows if "mat/active_fraction" in r and r["trainer/step"] > warmup_steps]
    return round(min(1.0, max(1e-3, float(np.mean(vals)))), 4) if vals else 1.0


# ----------------------------------------------------------------------------------------------------------------------
# Runs (launching lives in benchmarks/launching.py)
# ----------------------------------------------------------------------------------------------------------------------
def run_all(args: argparse.Namespace, scale: Scale, out: Path) -> None:
    """Per seed: full, then mat, rand, multirate, raptr at full's FLOPs budget (the order the dependencies need)."""
    common = ["--train_data", args.train_data, "--test_data", args.test_data,
              "--cache_dir", store.repo_relative(out / "cache"),
              "--eval_interval", str(scale.eval_interval), "--eval_batches", str(scale.eval_batches),
              "--log_interval", "50", "--wandb_mode", "offline", "--save_interval", str(scale.save_interval),
              *scale.model_flags()]
    for seed in args.seeds:
        seed_args = ["--seed", str(seed), *common]
        full_cfg = ds_config(mat_block("full", scale, seed, scale.steps, None), scale)
        full = ensure_run(out, seed, "full", full_cfg, [*seed_args, "--train_steps", str(scale.steps)],
                          scale.num_gpus, args.keep_checkpoints)
        budget = max(r["perf/flops_cumulative"] for r in full if "perf/flops_cumulative" in r)
        n_full = full[-1]["trainer/step"]
        capped = [*seed_args, "--train_steps", str(3 * n_full), "--flops_budget", repr(float(budget))]
        rand_fraction: Optional[float] = None
        for method in [m for m in METHODS[1:] if m in args.methods]:
            if method == "rand":
                mat_dir = run_dir(out, seed, "mat")
                if not is_complete(mat_dir):
                    raise RuntimeError("rand needs the same seed's MAT run for its active fraction: add mat to --methods")
                rand_fraction = mat_active_fraction(read_rows(store.metrics_path(mat_dir)), scale.mat_warmup)
            cfg = ds_config(mat_block(method, scale, seed, n_full, rand_fraction), scale)
            ensure_run(out, seed, method, cfg, capped, scale.num_gpus, args.keep_checkpoints)


# ----------------------------------------------------------------------------------------------------------------------
# Report math (pure functions on rows)
# ----------------------------------------------------------------------------------------------------------------------
def interp_at(xs: np.ndarray, ys: np.ndarray, x: float) -> float:
    """Linear interpolation of y at x inside [xs[0], xs[-1]] (tiny float slack at the ends), NaN outside: a run that
    never got that far, or was not evaluated that early, has no value there."""
    if len(xs) == 0 or not np.isfinite(x):
        return float("nan")
    tol = 1e-9 * max(abs(float(xs[-1])), 1.0)
    if x < xs[0] - tol or x > xs[-1] + tol:
        return float("nan")
    return float(np.interp(min(max(x, xs[0]), xs[-1]), xs, ys))


def first_reach(val: np.ndarray, target: float) -> Optional[int]:
    """Index of the first evaluation with val <= target, or None ("not reached")."""
    hits = np.nonzero(val <= target)[0]
    return int(hits[0]) if len(hits) else None


def run_metrics(rows: list[dict], full_rows: list[dict]) -> dict[str, float]:
    """One run's table entries against its seed's ``full`` run (the budget F and the target val loss come from it)."""
    full, c = eval_curve(full_rows), eval_curve(rows)
    budget = max(r["perf/flops_cumulative"] for r in full_rows if "perf/flops_cumulative" in r)
    n_full = max(r["trainer/step"] for r in full_rows if "perf/flops_cumulative" in r)
    target = float(np.min(full["val"]))
    i_full = first_reach(full["val"], target)
    assert i_full is not None
    i = first_reach(c["val"], target)
    train = [r for r in rows if "perf/flops_cumulative" in r]
    last = train[-1]
    steps = last["trainer/step"]
    full_last = [r for r in full_rows if "perf/flops_cumulative" in r][-1]
    out = {f"val@{k}/3": interp_at(c["flops"], c["val"], budget * k / 3) for k in (1, 2, 3)}
    test = c["test"][np.isfinite(c["test"])]
    out.update({
        "best_test": float(test.min()) if len(test) else float("nan"),
        "test_final": float(next((r["test/loss_final"] for r in reversed(rows) if "test/loss_final" in r), "nan")),
        "best_val": float(np.min(c["val"])) if len(c["val"]) else float("nan"),
        "target": target,
        "reach_flops": float("nan") if i is None else float(c["flops"][i] / full["flops"][i_full]),
        "reach_seconds": float("nan") if i is None else float(c["seconds"][i] / full["seconds"][i_full]),
        "reach_step": float("nan") if i is None else float(c["step"][i]),
        "flops_per_step": (last["perf/flops_cumulative"] / steps) / (budget / n_full),
        "seconds_per_step": (last["perf/train_seconds_cumulative"] / steps)
        / (full_last["perf/train_seconds_cumulative"] / n_full),
        "overhead": float(last.get("mat/refresh_share", 0.0)),
        "active": float(np.mean([r["mat/active_fraction"] for r in train if "mat/active_fraction" in r] or [1.0])),
        "steps": float(steps),
        "flops": float(last["perf/flops_cumulative"]),
        "budget": float(budget),
    })
    return out


@dataclass
class Agg:
    """Mean ± std over the seeds with a finite value; ``n`` of ``total`` seeds had one (std uses ddof=1, 0 if n=1)."""

    mean: float
    std: float
    n: int
    total: int

    @classmethod
    def of(cls, values: list[float]) -> "Agg":
        ok = np.array([v for v in values if v is not None and np.isfinite(v)], dtype=float)
        if not len(ok):
            return cls(float("nan"), float("nan"), 0, len(values))
        return cls(float(ok.mean()), float(ok.std(ddof=1)) if len(ok) > 1 else 0.0, len(ok), len(values))

    def fmt(self, digits: int = 3, missing: str = "n/a", pct: bool = False) -> str:
        if self.n == 0:
            return missing
        k = 100.0 if pct else 1.0
        text = f"{self.mean * k:.{digits}f}" + (f" ± {self.std * k:.{digits}f}" if self.n > 1 else "") + ("%" if pct else "")
        return text + (f" ({self.n}/{self.total})" if self.n < self.total else "")


COLUMNS = ("val@1/3", "val@2/3", "val@3/3", "best_test", "reach_flops", "reach_seconds", "flops_per_step",
           "seconds_per_step", "overhead", "active")


def per_seed_metrics(runs: RunSet) -> dict[str, dict[int, dict[str, float]]]:
    """{method: {seed: run_metrics}} for every seed that has a ``full`` run."""
    out: dict[str, dict[int, dict[str, float]]] = {}
    for seed, per in runs.items():
        if "full" not in per:
            continue
        for method in METHODS:
            if method in per:
                out.setdefault(method, {})[seed] = run_metrics(per[method], per["full"])
    return out


def summarize(per_seed: dict[str, dict[int, dict[str, float]]]) -> dict[str, dict[str, Agg]]:
    """{method: {column: Agg over seeds}}."""
    return {m: {col: Agg.of([v[col] for v in seeds.values()]) for col in (*COLUMNS, "steps", "test_final")}
            for m, seeds in per_seed.items()}


def paired_diff(per_seed: dict, a: str, b: str, col: str) -> Agg:
    """Mean ± std over seeds of (a - b) on one column, using only seeds where both ran: the fair way to compare two
    methods when seeds shift both alike."""
    seeds = sorted(set(per_seed.get(a, {})) & set(per_seed.get(b, {})))
    return Agg.of([per_seed[a][s][col] - per_seed[b][s][col] for s in seeds])


# ----------------------------------------------------------------------------------------------------------------------
# The report: docs/results.md
# ----------------------------------------------------------------------------------------------------------------------
HEADERS = {"val@1/3": "val @F/3", "val@2/3": "val @2F/3", "val@3/3": "val @F", "best_test": "best test",
           "reach_flops": "FLOPs to target (×full)", "reach_seconds": "time to target (×full)",
           "flops_per_step": "FLOPs/step (×full)", "seconds_per_step": "s/step (×full)",
           "overhead": "overhead (probe+policy)", "active": "active frac."}
TARGETS = {"reach_flops": 0.6, "reach_seconds": 0.75, "overhead": 0.05}


def machine_info(num_gpus: Optional[int]) -> dict:
    """What the timings depend on: CPU, OS, library versions, accelerator."""
    import importlib.metadata as md
    import platform

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else ""
    info = {"cpu_count": os.cpu_count(), "cpu": cpu or platform.machine(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": md.version("torch"), "deepspeed": md.version("deepspeed"),
            "ranks_per_run": num_gpus if num_gpus is not None else "all visible GPUs"}
    import torch

    info["accelerator"] = (f"{torch.cuda.device_count()} × {torch.cuda.get_device_name(0)}"
                           if torch.cuda.is_available() else "none (DeepSpeed CPU accelerator, gloo)")
    return info


def markdown_table(summary: dict[str, dict[str, Agg]]) -> str:
    lines = ["| method | " + " | ".join(HEADERS[c] for c in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for method, cols in summary.items():
        cells = []
        for c in COLUMNS:
            if c.startswith("reach"):
                cells.append(cols[c].fmt(2, missing="not reached"))
            elif c == "overhead":
                cells.append(cols[c].fmt(1, pct=True))
            else:
                cells.append(cols[c].fmt(2 if c in ("flops_per_step", "seconds_per_step", "active") else 3))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_seed_table(per_seed: dict[str, dict[int, dict[str, float]]]) -> str:
    f = lambda v, d=3: "—" if not np.isfinite(v) else f"{v:.{d}f}"  # noqa: E731
    lines = ["| method | seed | steps | FLOPs | val @F | best val | best test | final test (whole set) | "
             "FLOPs to target | time to target | overhead |", "|---" * 11 + "|"]
    for method, seeds in per_seed.items():
        for s, v in sorted(seeds.items()):
            lines.append(f"| {method} | {s} | {int(v['steps'])} | {v['flops']:.3g} | {f(v['val@3/3'])} | "
                         f"{f(v['best_val'])} | {f(v['best_test'])} | {f(v['test_final'])} | "
                         f"{f(v['reach_flops'], 2) if np.isfinite(v['reach_flops']) else 'not reached'} | "
                         f"{f(v['reach_seconds'], 2) if np.isfinite(v['reach_seconds']) else 'not reached'} | "
                         f"{100 * v['overhead']:.1f}% |")
    return "\n".join(lines)


def head_freeze_ceiling(scale: dict) -> Optional[float]:
    """FLOPs per step with EVERY head frozen relative to none (mat_ds.models.flops): the floor of what head freezing can buy."""
    try:
        from mat_ds.config import ModelConfig
        from mat_ds.models.flops import FlopsModel

        cfg = ModelConfig(n_layer=scale["n_layer"], n_head=scale["n_head"], d_model=scale["d_model"])
        fm = FlopsModel.for_run(cfg, scale["vocab_size"], scale["seq_len"], 0.15)
        return fm.train_per_token(cfg.n_layer * cfg.n_head) / fm.train_per_token(0)
    except Exception:  # noqa: BLE001 - commentary without this sentence is still correct
        return None


def _spread(d: Agg) -> str:
    """How a paired difference compares with its seed-to-seed spread, in words."""
    if d.n < 2:
        return "one seed, so no spread to judge it against"
    verdict = "within seed-to-seed noise" if abs(d.mean) <= d.std else "larger than the seed spread"
    return f"paired over {d.n} seeds, std of the difference {d.std:.3f}: {verdict}"


def commentary(per_seed: dict, summary: dict[str, dict[str, Agg]], meta: dict, load: list[float]) -> list[str]:
    """Plain statements generated from the numbers: targets met or not, differences with their seed spread."""
    out: list[str] = []
    n_seeds = len(per_seed.get("full", {}))
    if "mat" in summary:
        s = summary["mat"]
        for col, what in (("reach_flops", "FLOPs"), ("reach_seconds", "training wall-clock")):
            agg, thr = s[col], TARGETS[col]
            if agg.n == 0:
                out.append(f"**Target not met** ({what} ≤ {thr}× full to reach full's best validation loss): MAT did "
                           f"not reach that loss within its budget in any of its {agg.total} seed(s).")
            elif agg.n < agg.total:
                out.append(f"**Target not met** ({what} ≤ {thr}× full): MAT reached full's best validation loss in "
                           f"only {agg.n} of {agg.total} seeds (there it needed {agg.fmt(2)}×).")
            else:
                met = agg.mean <= thr
                out.append(f"**Target {'met' if met else 'not met'}** ({what} ≤ {thr}× full): MAT needed "
                           f"{agg.fmt(2)}× full's {what} to reach full's best validation loss.")
        ov = s["overhead"]
        out.append(f"**Overhead target {'met' if ov.mean <= TARGETS['overhead'] else 'not met'}** (≤ 5% of training "
                   f"time): mNTK probe + policy took {ov.fmt(1, pct=True)} of MAT's training time.")
        for col, what in (("val@3/3", "validation loss at the full budget F"), ("best_test", "best test loss")):
            d = paired_diff(per_seed, "mat", "full", col)
            if d.n:
                out.append(f"MAT's {what} is {abs(d.mean):.3f} {'lower (better)' if d.mean < 0 else 'higher (worse)'} "
                           f"than full's ({_spread(d)}).")
        d = paired_diff(per_seed, "mat", "rand", "val@3/3")
        if d.n:
            better = d.mean < 0 and d.n > 1 and abs(d.mean) > d.std
            out.append(f"Against its control `rand` (random heads at MAT's active fraction), MAT's validation loss at F "
                       f"is {abs(d.mean):.3f} {'lower' if d.mean < 0 else 'higher'} ({_spread(d)}): "
                       + ("evidence" if better else "no evidence here") + " that λmax picks better heads than chance.")
        ceiling = head_freeze_ceiling(meta.get("scale", {}))
        fps, act, sps = s["flops_per_step"], s["active"], s["seconds_per_step"]
        text = (f"MAT's FLOPs per step were {fps.mean:.2f}× full's (probe included; mean active fraction "
                f"{act.mean:.2f}) and its seconds per step {sps.mean:.2f}×.")
        if ceiling is not None:
            text += (f" Freezing a head skips only its weight-gradient GEMMs, so even with every head frozen a step of "
                     f"this model would cost {ceiling:.2f}× full's FLOPs: a 0.6× FLOPs target can only be met by "
                     f"needing fewer steps, not by cheaper ones.")
        out.append(text)
    ranked = sorted((m for m in summary if summary[m]["val@3/3"].n), key=lambda m: summary[m]["val@3/3"].mean)
    if ranked:
        out.append("Validation loss at F, best first: " + ", ".join(
            f"{m} {summary[m]['val@3/3'].mean:.3f}" for m in ranked) + "."
                   + ("" if ranked[0] == "mat" or "mat" not in summary else " MAT is not the best by mean here."))
    if load:
        out.append(f"Wall-clock comes from runs executed one after another on {meta.get('machine', {}).get('cpu_count')} "
                   f"cores; the 1-min load average before the runs ranged {min(load):.1f}–{max(load):.1f}, so other "
                   f"processes may have inflated some timings (FLOPs are unaffected).")
    out.append(f"{n_seeds} seed(s); ± is the sample standard deviation over seeds. Differences smaller than it are "
               f"not evidence either way.")
    return out


def write_results(results: Path, meta: dict, out: Path, runs: RunSet, per_seed: dict,
                  summary: dict[str, dict[str, Agg]], figures: dict[str, Path]) -> str:
    """Write the markdown report; return the main table (printed to stdout by main)."""
    table = markdown_table(summary)
    done = {(s, m): json.loads((run_dir(out, s, m) / "done.json").read_text())
            for s, per in runs.items() for m in per if (run_dir(out, s, m) / "done.json").is_file()}
    load = [d["loadavg_1min_before"] for d in done.values() if "loadavg_1min_before" in d]
    sc, mach = meta.get("scale", {}), meta.get("machine", {})
    first = next(iter(runs))
    cfg_of = lambda m, s=first: (json.loads((run_dir(out, s, m) / "ds_config.json").read_text())["mat"]  # noqa: E731
                                 if (run_dir(out, s, m) / "ds_config.json").is_file() else None)
    rand_f = {s: (cfg_of("rand", s) or {}).get("rand_active_fraction") for s in runs if "rand" in runs[s]}
    budgets = [v["budget"] for v in per_seed.get("full", {}).values()]
    md = ["# Does MAT train faster and perform better here?\n",
          "The paper's Table 1 question on this machine's data, generated by `benchmarks/paper_table.py` "
          f"({_dt.datetime.now().isoformat(timespec='seconds')}). Numbers below are computed, not edited.\n",
          "## Command\n", f"```bash\n{meta.get('command', '?')}\n```",
          *([f"Report regenerated with `{meta['report_command']}`."] if meta.get("report_command") else []),
          "\n## Machine\n",
          f"- CPU: {mach.get('cpu')} ({mach.get('cpu_count')} cores visible); accelerator: {mach.get('accelerator')}",
          f"- {mach.get('platform')}; Python {mach.get('python')}, torch {mach.get('torch')}, "
          f"deepspeed {mach.get('deepspeed')}; {mach.get('ranks_per_run')} ranks per run (ZeRO-2)",
          f"- time: {len(done)} runs took {sum(d['launch_seconds'] for d in done.values()) / 60:.1f} min launch to "
          f"exit (start-up, training, evaluation, teardown), mean {np.mean([d['launch_seconds'] for d in done.values()]):.0f}"
          f" s per run; the last harness invocation took {meta.get('harness_seconds', float('nan')) / 60:.1f} min "
          f"(runs already complete are skipped)" if done else "",
          "\n## Setup\n",
          f"- data: train `{_shown(meta.get('train_data'))}`, test `{_shown(meta.get('test_data'))}` (validation: held-out share of "
          f"the training blocks, the launcher's default)",
          f"- model: BERT (MLM) {sc.get('n_layer')} layers × {sc.get('n_head')} heads, d={sc.get('d_model')}, "
          f"seq {sc.get('seq_len')}, vocab {sc.get('vocab_size')}, micro-batch {sc.get('micro_batch')} per rank; "
          f"AdamW lr {sc.get('lr')} constant after {sc.get('lr_warmup')} warm-up steps",
          f"- budget: full trains N = {sc.get('steps')} steps; F = its cumulative FLOPs "
          f"({np.mean(budgets):.3g} on average); every other method stops at F (cap 3N steps). Evaluation every "
          f"{sc.get('eval_interval')} steps on {sc.get('eval_batches')} micro-batches per rank (val and test).",
          f"- seeds: {', '.join(map(str, runs))}; mat: `{json.dumps(cfg_of('mat'))}`",
          f"- rand: active fraction per seed = MAT's mean after warm-up: {rand_f}" if rand_f else "",
          f"- multirate: `{json.dumps(cfg_of('multirate'))}`; raptr: `{json.dumps(cfg_of('raptr'))}`",
          "\n## Results (mean ± std over seeds)\n", table, "",
          "*val @F/3, @2F/3, @F*: validation loss interpolated at that share of full's FLOPs. *best test*: lowest test "
          "loss over the evaluations. *FLOPs / time to target*: cumulative FLOPs / training seconds (evaluation "
          "excluded) at the first evaluation with validation loss ≤ the same seed's best full validation loss, divided "
          "by full's at its best; `not reached` if never, `(k/n)`: reached in k of n seeds. *FLOPs/step, s/step*: "
          "per-step averages relative to full. *overhead*: probe + policy seconds / training seconds. *active frac.*: "
          "mean share of heads trained per step.\n",
          "### Per seed\n", per_seed_table(per_seed), "",
          "\n## Plots\n"]
    for name, path in figures.items():
        md.append(f"![{name}]({os.path.relpath(path, results.parent)})\n")
    md += ["## What the numbers say\n", *[f"- {line}" for line in commentary(per_seed, summary, meta, load)], "",
           _kept_converge(results), "## Discussion\n", _kept_discussion(results)]
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text("\n".join(line for line in md if line is not None) + "\n", encoding="utf-8")
    return table


# ----------------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------------
def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train_data", default=None, help=f"training text (default {DEFAULT_TRAIN}); any launcher form")
    p.add_argument("--test_data", default=None, help=f"test text (default {DEFAULT_TEST})")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--methods", nargs="+", default=None,
                   help=f"small/full scale: from {list(METHODS)} (full always runs: it sets the budget; rand needs mat);"
                        " --converge: from benchmarks/converge.py's TABLE_METHODS and sweep names")
    p.add_argument("--converge", action="store_true",
                   help="the convergence regime (benchmarks/converge.py): every method trains until its test loss has "
                        "bottomed out (early stopping with --patience)")
    p.add_argument("--sweep", action="store_true", help="--converge only: the α/β grid and the option runs")
    p.add_argument("--jobs", type=int, default=2, help="--converge only: single-rank runs side by side")
    p.add_argument("--patience", type=int, default=None, help="--converge only: evaluations without a new best test "
                                                              "loss before a run stops (default 6)")
    p.add_argument("--cap", type=int, default=None,
                   help="--converge only: step cap per run (default 8000). Unlike --steps nothing else rescales, so a "
                        "larger cap continues the runs the old cap stopped from their final checkpoint; runs that "
                        "early stopping ended are kept as they are")
    p.add_argument("--schedule", choices=SCHEDULES, default=None,
                   help="--converge only: LR schedule (default constant after warm-up; cosine decays over the "
                        "step cap, the fixed horizon every method then shares)")
    p.add_argument("--lr", type=float, default=None, help="--converge only: peak LR (default the scale's, 2e-3)")
    p.add_argument("--full", action="store_true", help="GPU scale (12L d768 12h) instead of the small CPU scale")
    p.add_argument("--steps", type=int, default=None, help="override N (full's steps); evals/warm-ups scale with it")
    p.add_argument("--num_gpus", type=int, default=None, help="ranks per run (default: 2 small, all GPUs --full)")
    p.add_argument("--out", default=None, help="run directory (default runs/paper_table[_full])")
    p.add_argument("--results", default=str(REPO / "docs" / "results.md"), help="report; plots go next to it")
    p.add_argument("--report_only", action="store_true", help="no launches: recompute the report from existing runs")
    p.add_argument("--keep_checkpoints", action="store_true", help="keep each run's final DeepSpeed checkpoint")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.converge:
        converge = _converge()
        allowed = list(converge.TABLE_METHODS) + converge.sweep_methods()
        default = (["full", "mat", *converge.sweep_methods()] if args.sweep else list(converge.TABLE_METHODS))
        args.methods = args.methods or default
        bad = [m for m in args.methods if m not in allowed]
        if bad:
            p.error(f"--methods {bad}: not converge methods ({allowed})")
        if args.jobs < 1:
            p.error("--jobs must be >= 1")
        args.patience = converge.PATIENCE if args.patience is None else args.patience
        if args.patience < 0:
            p.error("--patience must be >= 0 (0 = off: every run trains to its step cap)")
        if args.lr is not None and not args.lr > 0:
            p.error("--lr must be > 0")
        if args.cap is not None and (args.cap < 1 or args.steps is not None):
            p.error("--cap must be >= 1 and cannot be combined with --steps")
        return args
    if args.sweep or args.patience is not None or args.cap is not None or args.schedule or args.lr is not None:
        p.error("--sweep, --patience, --cap, --schedule and --lr need --converge")
    bad = [m for m in (args.methods or []) if m not in METHODS]
    if bad:
        p.error(f"--methods {bad}: choose from {list(METHODS)}")
    args.methods = ["full", *[m for m in METHODS[1:] if m in (args.methods or METHODS)]]
    return args


def _resolve_data(given: Optional[str], default: Path, what: str) -> str:
    path = given if given is not None else str(default)
    if path.startswith("hf:") or path == "default" or any(ch in path for ch in "*?["):
        return path
    if not Path(path).exists():
        raise SystemExit(f"error: {what} {path} not found (pass --{what.replace(' ', '_')} PATH)")
    return store.repo_relative(path)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.converge:
        return _converge().main(args)
    scale = FULL if args.full else SMALL
    if args.steps is not None:
        if args.steps < 3:
            raise SystemExit("error: --steps must be >= 3")
        scale = scale.with_steps(args.steps)
    if args.num_gpus is not None:
        scale = dataclasses.replace(scale, num_gpus=args.num_gpus)
    out = Path(args.out or REPO / "runs" / ("paper_table_full" if args.full else "paper_table")).resolve()
    if __package__:  # python -m benchmarks.paper_table (or called from an importer)
        entry = ["-m", f"{__package__}.paper_table"]
    else:
        entry = [os.path.relpath(__file__, REPO) if Path(__file__).is_relative_to(REPO) else __file__]
    command = "python " + shlex.join([*entry, *(sys.argv[1:] if argv is None else argv)])
    meta_path = out / "harness.json"
    if args.report_only:
        if not meta_path.is_file():
            raise SystemExit(f"error: {meta_path} not found: no harness runs under {out}")
        meta = json.loads(meta_path.read_text())
        meta["report_command"] = command
    else:
        args.train_data = _resolve_data(args.train_data, DEFAULT_TRAIN, "train data")
        args.test_data = _resolve_data(args.test_data, DEFAULT_TEST, "test data")
        if args.full and args.train_data == store.repo_relative(DEFAULT_TRAIN):
            print("[paper_table] note: --full on WikiText-2 valid.txt (~1,800 blocks) repeats it ~100 times; for a "
                  "meaningful GPU run pass e.g. --train_data hf:wikitext:wikitext-103-raw-v1", flush=True)
        out.mkdir(parents=True, exist_ok=True)
        meta = {"command": command, "scale": dataclasses.asdict(scale), "seeds": args.seeds, "methods": args.methods,
                "train_data": args.train_data, "test_data": args.test_data, "machine": machine_info(scale.num_gpus),
                "started": _dt.datetime.now().isoformat(timespec="seconds")}
        meta_path.write_text(json.dumps(meta, indent=2))
        t0 = time.perf_counter()
        try:
            run_all(args, scale, out)
        except RuntimeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        meta["harness_seconds"] = time.perf_counter() - t0
        meta_path.write_text(json.dumps(meta, indent=2))
    runs = load_runs(out)
    runs = {s: {m: rows for m, rows in per.items() if m in meta["methods"]} for s, per in runs.items()
            if s in meta["seeds"]}
    if not any("full" in per for per in runs.values()):
        raise SystemExit(f"error: no complete full run under {out}")
    results = Path(args.results).resolve()
    figures = plots.make_all(out, results.parent, runs)
    per_seed = per_seed_metrics(runs)
    table = write_results(results, meta, out, runs, per_seed, summarize(per_seed), figures)
    print(table)
    print(f"[paper_table] wrote {results} and {', '.join(p.name for p in figures.values())}")
    return 0

def _converge():
    """benchmarks/converge.py (imported late: it imports this module)."""
    try:
        from benchmarks import converge
    except ImportError:  # python benchmarks/paper_table.py
        import converge  # type: ignore[no-redef]
    return converge


def _kept_converge(results: Path) -> str:
    """The converge section (written by benchmarks/converge.py between its markers) survives a small-scale report."""
    begin, end = "<!-- converge:begin -->", "<!-- converge:end -->"
    text = results.read_text(encoding="utf-8") if results.is_file() else ""
    if begin not in text or end not in text:
        return ""
    return begin + text.split(begin, 1)[1].split(end, 1)[0] + end + "\n"


def _kept_discussion(results: Path) -> str:
    """The human-written ``## Discussion`` of an existing results file survives a regeneration (else a placeholder)."""
    placeholder = "_Placeholder — to be written by a human after reading the numbers above._\n"
    if not results.is_file():
        return placeholder
    text = results.read_text(encoding="utf-8")
    marker = "\n## Discussion\n"
    if marker not in text:
        return placeholder
    kept = text.split(marker, 1)[1].strip()
    return kept + "\n" if kept else placeholder


def _shown(path: Optional[str]) -> Optional[str]:
    """A data path as the report shows it: relative to the repository when it is a local path, as given otherwise."""
    if not path or path.startswith("hf:") or not os.path.isabs(path):
        return path
    return os.path.relpath(path, REPO)


if __name__ == "__main__":
    sys.exit(main())
