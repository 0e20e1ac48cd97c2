"""Figures for the paper-table benchmark, drawn from the runs' ``metrics.jsonl`` files.

    python -m benchmarks.plots --out runs/paper_table --docs docs

Reads ``OUT/seed{S}/{method}/metrics.jsonl`` (the layout ``benchmarks/paper_table.py`` writes) and draws three PNGs:

* ``val_loss_vs_flops.png`` — validation loss against cumulative FLOPs (training + mNTK probe), one colour per method:
  thin lines per seed, a bold mean with a ±std band on the FLOPs range all seeds cover. Equal compute is the paper's
  x-axis, so "faster" reads as "left of full at the same loss";
* ``mat_lambda_heatmap.png`` — λmax of every head (rows ``L{l}H{h}``) at every refresh (columns) of the first seed's MAT
  run, the analogue of the paper's Figure 3. Which heads were frozen is not logged per head, so it is *replayed*: the
  MAT policy is deterministic given the λmax sequence, so feeding the logged λmax back into ``mat_ds.core.policy`` gives the
  decisions; they are drawn (×) only if the replay's frozen counts match the logged ``mat/frozen_heads`` at every
  refresh;
* ``active_fraction.png`` — share of heads trained per step, per method, first seed (multirate alternates every step,
  so a moving average is drawn over the raw trace).

The run layout, records and rows live in ``benchmarks/runs.py``.
"""
from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

try:  # python -m benchmarks.plots, or imported
    from benchmarks.store import (METHODS, REPO, Rows, RunSet, eval_curve, is_complete, load_runs,  # noqa: E402
                                 metrics_path, read_rows, run_dir, series)
except ImportError:  # python benchmarks/plots.py
    from store import (METHODS, REPO, Rows, RunSet, eval_curve, is_complete, load_runs,  # type: ignore  # noqa: E402
                      metrics_path, read_rows, run_dir, series)

COLORS = {"full": "black", "mat": "tab:red", "rand": "tab:blue", "multirate": "tab:green", "raptr": "tab:purple"}
LAMBDA_KEY = re.compile(r"^mat/lambda_max/L(\d+)H(\d+)$")




# ----------------------------------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------------------------------
def save(fig, path: Path, ax=None, legend_loc: Optional[str] = None) -> Path:
    """The one ending of every figure here: legend + light grid on ``ax`` (if given), tight layout, PNG at 120 dpi."""
    if ax is not None:
        ax.legend(fontsize=8, **({"loc": legend_loc} if legend_loc else {}))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_val_vs_flops(runs: RunSet, path: Path, budget: Optional[float] = None,
                      target: Optional[float] = None) -> Path:
    """Validation loss vs cumulative FLOPs; ``budget`` (mean full FLOPs) marks F/3, 2F/3, F; ``target`` (mean of the
    seeds' best full val loss) is the line the reach-time columns of the table refer to."""
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    methods = [m for m in METHODS if any(m in per for per in runs.values())]
    for method in methods:
        curves = [eval_curve(per[method]) for per in runs.values() if method in per]
        curves = [c for c in curves if len(c["flops"])]
        if not curves:
            continue
        color = COLORS.get(method, None)
        for c in curves:
            ax.plot(c["flops"], c["val"], color=color, lw=0.7, alpha=0.35)
        lo = max(c["flops"][0] for c in curves)
        hi = min(c["flops"][-1] for c in curves)
        if hi > lo:
            grid = np.linspace(lo, hi, 60)
            ys = np.stack([np.interp(grid, c["flops"], c["val"]) for c in curves])
            mean, std = ys.mean(0), ys.std(0, ddof=1) if len(curves) > 1 else np.zeros(len(grid))
            ax.plot(grid, mean, color=color, lw=2, label=f"{method} (n={len(curves)})")
            ax.fill_between(grid, mean - std, mean + std, color=color, alpha=0.15, lw=0)
        else:
            ax.plot([], [], color=color, lw=2, label=f"{method} (n={len(curves)})")
    if budget:
        for frac, label in ((1 / 3, "F/3"), (2 / 3, "2F/3"), (1.0, "F")):
            ax.axvline(budget * frac, color="grey", ls=":", lw=1)
            ax.text(budget * frac, 0.99, label, transform=ax.get_xaxis_transform(), ha="right", va="top",
                    fontsize=8, color="grey")
    if target is not None and math.isfinite(target):
        ax.axhline(target, color="black", ls="--", lw=0.8, label="full's best val (target)")
    ax.set_xlabel("cumulative FLOPs (training + mNTK probe)")
    ax.set_ylabel("validation loss")
    ax.set_title("Validation loss at equal compute (thin: seeds, band: mean ± std)")
    vals = np.concatenate([eval_curve(per[m])["val"] for per in runs.values() for m in per] or [np.array([1.0])])
    vals = vals[np.isfinite(vals)]
    if len(vals) > 4:  # the first evals are far above the rest; zoom on where methods differ
        ax.set_ylim(vals.min() - 0.05 * (np.percentile(vals, 80) - vals.min()), np.percentile(vals, 90))
    return save(fig, path, ax)


def lambda_matrix(rows: Rows) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(labels "L{l}H{h}", refresh steps, λmax [heads, refreshes]) from a MAT run. λmax of the refresh at step t is
    logged in the row of step t+1, so the refresh step is the row's step minus one."""
    heads = sorted({tuple(map(int, m.groups())) for r in rows for k in r if (m := LAMBDA_KEY.match(k))})
    refresh_rows = [r for r in rows if any(LAMBDA_KEY.match(k) for k in r)]
    lam = np.array([[float(r.get(f"mat/lambda_max/L{l}H{h}", math.nan)) for r in refresh_rows] for l, h in heads])
    steps = np.array([r["trainer/step"] - 1 for r in refresh_rows], dtype=int)
    return [f"L{l}H{h}" for l, h in heads], steps, lam.reshape(len(heads), len(refresh_rows))


def replay_frozen(rows: Rows, mat_block: dict, labels: list[str], steps: np.ndarray,
                  lam: np.ndarray) -> Optional[np.ndarray]:
    """Frozen mask [heads, refreshes] decided at each refresh, replayed through mat_ds's MAT policy; None if the
    replay cannot be checked against the logged ``mat/frozen_heads`` counts or disagrees with them."""
    try:
        import torch

        from mat_ds.core.config import MATConfig
        from mat_ds.core.policy import make_policy
    except Exception:  # noqa: BLE001 - the heatmap is still useful without the marks
        return None
    n_layer = 1 + max(int(s[1:].split("H")[0]) for s in labels)
    try:
        policy = make_policy(MATConfig.from_dict(mat_block), len(labels), n_layer)
    except Exception:  # noqa: BLE001
        return None
    logged = {r["trainer/step"] - 1: r.get("mat/frozen_heads") for r in rows if any(LAMBDA_KEY.match(k) for k in r)}
    out = np.zeros(lam.shape, dtype=bool)
    for j, step in enumerate(steps):
        frozen = policy.update(int(step), torch.tensor(lam[:, j], dtype=torch.float64)).numpy()
        if logged.get(int(step)) is None or int(frozen.sum()) != int(logged[int(step)]):
            return None
        out[:, j] = frozen
    return out


def plot_lambda_heatmap(rows: Rows, path: Path, mat_block: Optional[dict] = None) -> Optional[Path]:
    """Layer·head × refresh heatmap of λmax (log colour scale when λmax spans more than a decade)."""
    labels, steps, lam = lambda_matrix(rows)
    if not labels or lam.size == 0:
        return None
    frozen = replay_frozen(rows, mat_block, labels, steps, lam) if mat_block else None
    fig, ax = plt.subplots(figsize=(max(5.0, 1.5 + 0.45 * len(steps)), max(3.0, 1.2 + 0.28 * len(labels))))
    finite = lam[np.isfinite(lam) & (lam > 0)]
    norm = None
    if finite.size and finite.max() / finite.min() > 10:
        norm = matplotlib.colors.LogNorm(vmin=finite.min(), vmax=finite.max())
    im = ax.imshow(np.where(lam > 0, lam, np.nan) if norm else lam, aspect="auto", cmap="viridis", norm=norm,
                   interpolation="nearest")
    if frozen is not None:
        for i, j in zip(*np.nonzero(frozen)):
            ax.text(j, i, "×", ha="center", va="center", color="white", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xticks(range(len(steps)), [str(s) for s in steps], fontsize=7, rotation=90)
    ax.set_xlabel("refresh step")
    ax.set_ylabel("layer · head")
    mark = "× = frozen by the decision at this refresh (replayed)" if frozen is not None else "frozen set not shown"
    ax.set_title(f"MAT: λmax per head over training ({mark})", fontsize=9)
    fig.colorbar(im, ax=ax, label="λmax (mNTK principal eigenvalue)")
    return save(fig, path)


def plot_active_fraction(per_method: dict[str, Rows], path: Path, seed: Optional[int] = None,
                         window: int = 20) -> Path:
    """Share of heads trained at each step (raw, faint) and its moving average over ``window`` steps."""
    fig, ax = plt.subplots(figsize=(7.5, 4.0))
    for method in [m for m in METHODS if m in per_method]:
        x, y = series(per_method[method], "mat/active_fraction")
        if not len(x):
            continue
        color = COLORS.get(method)
        ax.plot(x, y, color=color, lw=0.8, alpha=0.35)
        w = max(1, min(window, len(y) // 8))  # short runs: a short window, or the curve would vanish
        smooth = np.convolve(y, np.ones(w) / w, mode="valid")
        ax.plot(x[w - 1:], smooth, color=color, lw=1.8, label=f"{method} (mean {y.mean():.2f})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("active fraction of heads")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"Active fraction per step{'' if seed is None else f', seed {seed}'} "
                 f"(bold: moving average over up to {window} steps)", fontsize=10)
    return save(fig, path, ax, legend_loc="lower left")


def make_all(out: Path, docs: Path, runs: Optional[RunSet] = None) -> dict[str, Path]:
    """Draw every figure that the available runs allow; returns {name: path}."""
    runs = load_runs(out) if runs is None else runs
    docs.mkdir(parents=True, exist_ok=True)
    made: dict[str, Path] = {}
    if not runs:
        return made
    budgets = [per["full"][-1]["perf/flops_cumulative"] for per in runs.values()
               if "full" in per and per["full"] and "perf/flops_cumulative" in per["full"][-1]]
    targets = [float(np.nanmin(eval_curve(per["full"])["val"])) for per in runs.values()
               if "full" in per and len(eval_curve(per["full"])["val"])]
    made["val_loss_vs_flops"] = plot_val_vs_flops(runs, docs / "val_loss_vs_flops.png",
                                                  budget=float(np.mean(budgets)) if budgets else None,
                                                  target=float(np.mean(targets)) if targets else None)
    first = next(iter(runs))
    if "mat" in runs[first]:
        cfg_path = run_dir(out, first, "mat") / "ds_config.json"
        block = json.loads(cfg_path.read_text())["mat"] if cfg_path.is_file() else None
        heat = plot_lambda_heatmap(runs[first]["mat"], docs / "mat_lambda_heatmap.png", block)
        if heat is not None:
            made["mat_lambda_heatmap"] = heat
    made["active_fraction"] = plot_active_fraction(runs[first], docs / "active_fraction.png", seed=first)
    return made


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "runs" / "paper_table"), help="the harness's run directory")
    parser.add_argument("--docs", default=str(REPO / "docs"), help="where the PNGs go")
    args = parser.parse_args(argv)
    if not Path(args.out).is_dir():
        print(f"error: run directory {args.out} does not exist", file=sys.stderr)
        return 2
    made = make_all(Path(args.out), Path(args.docs))
    if not made:
        print(f"error: no complete runs under {args.out}", file=sys.stderr)
        return 2
    for path in made.values():
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
