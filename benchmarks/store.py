"""Benchmark runs on disk (the store): the layout (``OUT/seed{S}/{method}/``), the committed records, rows and curves.

A run directory holds ``spec.json``, ``launch.log``, ``metrics.jsonl`` and, once finished, ``done.json`` and the record
``metrics.jsonl.gz`` (``benchmarks/records/`` commits spec, done, record and log). Everything that reads or writes
those files, or turns rows into curves, lives here; the figures (``plots.py``) and the harnesses import it.
"""
from __future__ import annotations

import gzip
import json
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
METHODS = ("full", "mat", "rand", "multirate", "raptr")  # the short-run table's methods, in report order

Rows = list[dict]
RunSet = dict[int, dict[str, Rows]]  # seed -> method -> merged rows


def repo_relative(path, repo: Path = REPO) -> str:
    """``path`` as benchmark runs name it: they are launched with the repository as working directory, so a path in
    the repository or beside it (``../shared/data``) is written relative to the repository, and specs, launch logs and
    committed records name no machine's directories (a fresh clone elsewhere matches them). Other paths stay
    absolute.

    The path is made absolute lexically (``os.path.abspath``), never through ``resolve()``: with ``../shared`` a
    symbolic link (a normal checkout layout) resolving would leave the repository's parent and name the link's
    target. A path given as that target (``/data/shared/x``, where ``../shared`` links to ``/data/shared``) is
    mapped back through the sibling link that points there."""
    p = Path(os.path.abspath(path))
    if p.is_relative_to(repo.parent):
        return os.path.relpath(p, repo)
    real = p.resolve()
    for sibling in sorted(repo.parent.iterdir()) if repo.parent.is_dir() else ():
        if sibling.is_symlink() and real.is_relative_to(sibling.resolve()):
            return os.path.relpath(sibling / real.relative_to(sibling.resolve()), repo)
    return str(p)


def portable_log(directory: Path) -> None:
    """Rewrite a finished run's ``launch.log`` with the repository's absolute prefix made relative, as
    ``repo_relative`` does for the paths the harness passes: the launcher itself logs ``sys.executable``, which is
    absolute (the virtual environment's interpreter)."""
    log = Path(directory) / "launch.log"
    if log.is_file():
        text = log.read_text(encoding="utf-8", errors="replace")
        text = text.replace(f"{REPO}{os.sep}", "").replace(f"{REPO.parent}{os.sep}", f"..{os.sep}")
        log.write_text(text, encoding="utf-8")


def run_dir(out: Path, seed: int, method: str) -> Path:
    return Path(out) / f"seed{seed}" / method


RECORD = "metrics.jsonl.gz"  # a finished run's metrics as committed (benchmarks/records/)


def metrics_path(directory: Path) -> Path:
    """A run's metrics: the live ``metrics.jsonl`` where the run was made, else its committed record
    ``metrics.jsonl.gz`` (``write_record``), so a fresh clone can redraw a report from the records alone."""
    live = Path(directory) / "metrics.jsonl"
    return live if live.is_file() or not (live.parent / RECORD).is_file() else live.parent / RECORD


def write_record(directory: Path) -> Path:
    """Write a finished run's ``metrics.jsonl`` as ``metrics.jsonl.gz`` (~6x smaller), byte-for-byte reproducible
    (no timestamp in the gzip header) so rewriting an unchanged record leaves git with nothing to commit."""
    src, dst = Path(directory) / "metrics.jsonl", Path(directory) / RECORD
    with open(src, "rb") as fh, open(dst, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
        shutil.copyfileobj(fh, gz)
    portable_log(directory)
    return dst


def read_rows(path: Path) -> Rows:
    """Rows of one metrics.jsonl (or its ``.gz`` record), merged by ``trainer/step`` (the trainer logs the final
    full-test-set loss as a second row with the last step) and sorted by step. A truncated last line (a run killed
    mid-write) is ignored."""
    by_step: dict[int, dict] = {}
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            by_step.setdefault(int(row.get("trainer/step", 0)), {}).update(row)
    return [by_step[s] for s in sorted(by_step)]


def is_complete(directory: Path) -> bool:
    """A run counts only once the harness saw its launcher exit 0 (``done.json``) and its metrics exist."""
    return (Path(directory) / "done.json").is_file() and metrics_path(directory).is_file()


def load_runs(out: Path, complete_only: bool = True) -> RunSet:
    """All runs under ``out`` as {seed: {method: rows}}, methods in the canonical order."""
    runs: RunSet = {}
    for seed_dir in sorted(Path(out).glob("seed*")):
        m = re.fullmatch(r"seed(\d+)", seed_dir.name)
        if not m:
            continue
        for method in METHODS:
            d = seed_dir / method
            if metrics_path(d).is_file() and (is_complete(d) or not complete_only):
                runs.setdefault(int(m.group(1)), {})[method] = read_rows(metrics_path(d))
    return dict(sorted(runs.items()))


def eval_curve(rows: Rows) -> dict[str, np.ndarray]:
    """The evaluation points of a run: step, cumulative FLOPs, cumulative train seconds, val loss, test loss (NaN where
    the test set was not evaluated), sorted by step."""
    pts = [r for r in rows if "val/loss" in r and "perf/flops_cumulative" in r]
    get = lambda key: np.array([float(r.get(key, math.nan)) for r in pts], dtype=float)  # noqa: E731
    return {"step": get("trainer/step"), "flops": get("perf/flops_cumulative"),
            "seconds": get("perf/train_seconds_cumulative"), "val": get("val/loss"), "test": get("test/loss")}


def series(rows: Rows, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of every row that has ``key``."""
    pts = [(r["trainer/step"], float(r[key])) for r in rows if key in r]
    return np.array([p[0] for p in pts], dtype=float), np.array([p[1] for p in pts], dtype=float)
