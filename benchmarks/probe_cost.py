"""What does one mNTK refresh cost per transformer layer? Refresh time and peak memory of the per-unit Gram,
materialised vs ghost vs the form ``ghost.choose`` picks, over (n, T, d); and the refresh's share of training time at
the project's default config.

    python -m benchmarks.probe_cost              # grid + 2 default-config trainer runs (~30 min on 2 shared cores)
    python -m benchmarks.probe_cost --quick      # 2 small cells, no trainer run (the test; ~2 s after imports)
    python -m benchmarks.probe_cost --train_repeats 0 --train_runs runs/a runs/b   # reuse finished trainer runs
    python -m benchmarks.probe_cost --from_json runs/probe_cost/result.json       # re-render the report only

Per cell (d, T, n), single process, fp32, random x [n, T, d_in] and dy [n, T, d_out], ONE head-wise layer pair per
transformer layer with H = d/64 units: QKV ``HeadwiseLinear(d, 3d, H, "out")`` and output projection
``HeadwiseLinear(d, d, H, "in")``. Each layer's Gram [H, n, n] by

* ``materialized``: ``mntk.shard_unit_gram(x, dy, m, 0, rows*cols)`` (the n per-sample gradients, then their Gram);
* ``ghost``: ``ghost.ghost_unit_gram(x, dy, m)`` (activation Grams, nothing of size d_in·d_out);
* ``auto``: ``ghost.choose(m, n, T, "auto", 2 GiB)`` (the default ``mat.probe_memory_mb`` = 2048) then that form.

Time (1 torch thread by default, ``--threads``): one warm-up call per form, then ``repeats`` rounds in which the three
forms take turns (order rotated every round, so drift in machine load hits all of them alike); the median per form is
reported. Peak memory: MEASURED per call as the rise of the process's resident set over its value just before the
call, on Linux: glibc's free lists are returned to the kernel first (``malloc_trim(0)``), the kernel's peak-RSS
counter is reset (``/proc/self/clear_refs`` ← 5), the call runs, and VmHWM − VmRSS(before) from ``/proc/self/status``
is its peak extra memory (max over the form's calls). Torch's CPU allocator has no cache, so this sees every
intermediate tensor the call creates (checked at start-up against a tensor of known size). Both forms' Grams are
compared in every cell: max |ghost − materialized| / max |materialized|.

Cells whose slower form would exceed ``--max_gflop`` cost-model GFLOP for the layer pair are dropped (listed with their
computed figures), and d = 4096 / 8192 are computed from the cost model only (``ghost.layer_cost``). Output: a table,
one ``PROBE_COST {json}`` line, ``docs/probe_cost.md`` and the raw ``runs/probe_cost/result.json``. The trainer runs
(``--train_repeats``, after the grid, one at a time) are ``deepspeed --num_gpus 2 --module mat_ds.pretrain
--deepspeed_config configs/bert_mat_zero2.json --train_steps 100`` into ``runs/probe_cost/run{i}``; the report quotes
their ``mat/refresh_share``. Timings are printed, never asserted.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import torch

from mat_ds.core import ghost
from mat_ds.core.headwise import HeadwiseLinear
from mat_ds.core.mntk import shard_unit_gram, unit_param_shape

ROOT = Path(__file__).resolve().parents[1]
DS, TS, NS = (256, 512, 1024, 2048), (64, 128, 512), (8, 16, 32)
COMPUTED_DS = (4096, 8192)
QUICK_CELLS = ((256, 64, 8), (512, 64, 8))
DEFAULT_SHAPE = (128, 4, 128, 16)  # configs/bert_mat_zero2.json's model: d 128, 4 heads, seq 128, probe_samples 16
LIMIT = 2048 << 20  # mat.probe_memory_mb default
FORMS = ("materialized", "ghost", "auto")
TRAIN_CONFIG = "configs/bert_mat_zero2.json"
MiB = 2 ** 20


# ----------------------------------------------------------------------------------------------------------------------
# Peak memory of one call (measured)
# ----------------------------------------------------------------------------------------------------------------------
class PeakRSS:
    """Peak resident-memory rise of a call: trim malloc, reset the kernel's high-water mark, call, read VmHWM."""

    def __init__(self) -> None:
        self.libc = None
        self.available = False
        try:
            self.libc = ctypes.CDLL("libc.so.6")
            self._reset()
            self._status()
            self.available = True
        except (OSError, AttributeError, KeyError):
            self.available = False

    @staticmethod
    def _status() -> dict[str, int]:
        out = {}
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmHWM:", "VmRSS:")):
                    key, val = line.split(":")
                    out[key] = int(val.split()[0]) * 1024
        return {"VmHWM": out["VmHWM"], "VmRSS": out["VmRSS"]}

    def _reset(self) -> None:
        # No gc.collect(): tensors are freed by reference counting, and a collection costs ~0.3 s with DeepSpeed
        # imported.
        self.libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS (VmHWM) to the current RSS

    def call(self, fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float, Optional[int]]:
        """(result, wall seconds of ``fn`` alone, peak extra bytes or None where not measurable)."""
        if not self.available:
            t0 = time.perf_counter()
            out = fn()
            return out, time.perf_counter() - t0, None
        self._reset()
        before = self._status()["VmRSS"]
        t0 = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - t0
        return out, seconds, max(self._status()["VmHWM"] - before, 0)

    def calibrate(self, mib: int = 256) -> Optional[float]:
        """Measured MiB of a call that creates one ``mib`` MiB tensor (should read ≈ mib)."""
        _, _, peak = self.call(lambda: torch.ones(mib * MiB // 4).sum())
        return None if peak is None else peak / MiB


# ----------------------------------------------------------------------------------------------------------------------
# One cell
# ----------------------------------------------------------------------------------------------------------------------
def layer_pair(d: int, H: int) -> dict[str, HeadwiseLinear]:
    """QKV and output projection of one transformer layer (weights on the meta device: the Grams need none)."""
    return {"qkv": HeadwiseLinear(d, 3 * d, H, "out", layer=0, device="meta"),
            "out": HeadwiseLinear(d, d, H, "in", layer=0, device="meta")}


def gram(form: str, x: torch.Tensor, dy: torch.Tensor, m: HeadwiseLinear) -> torch.Tensor:
    n, T = x.shape[:2]
    if form == "auto":
        form = ghost.choose(m, n, T, "auto", LIMIT)
    if form == "ghost":
        return ghost.ghost_unit_gram(x, dy, m)
    rows, cols = unit_param_shape(m)
    return shard_unit_gram(x, dy, m, 0, rows * cols)


def pair_gflop(d: int, T: int, n: int, H: int) -> dict[str, float]:
    """Cost-model GFLOP of each form for the layer pair."""
    costs = [ghost.layer_cost(n, T, m.d_in, m.d_out, m.n_units) for m in layer_pair(d, H).values()]
    return {"materialized": sum(c.materialized_flops for c in costs) / 1e9,
            "ghost": sum(c.ghost_flops for c in costs) / 1e9}


def measure_cell(d: int, T: int, n: int, H: int, repeats: int, peak: PeakRSS) -> list[dict]:
    """One row per layer of the pair: times, peak memory, the auto pick, the measured faster form, agreement."""
    rows = []
    for name, m in layer_pair(d, H).items():
        gen = torch.Generator().manual_seed(1000 * d + 10 * T + n + (name == "out"))
        x = torch.randn(n, T, m.d_in, generator=gen)
        dy = torch.randn(n, T, m.d_out, generator=gen)
        times: dict[str, list[float]] = {f: [] for f in FORMS}
        mem: dict[str, list[int]] = {f: [] for f in FORMS}
        outs = {}
        for f in FORMS:  # warm-up: its result is the one compared; its memory counts
            outs[f], _, b = peak.call(partial(gram, f, x, dy, m))
            if b is not None:
                mem[f].append(b)
        for r in range(repeats):
            order = FORMS[r % 3:] + FORMS[:r % 3]
            for f in order:
                out, s, b = peak.call(partial(gram, f, x, dy, m))
                del out
                times[f].append(s)
                if b is not None:
                    mem[f].append(b)
        cost = ghost.layer_cost(n, T, m.d_in, m.d_out, m.n_units)
        pick = ghost.choose(m, n, T, "auto", LIMIT)
        med = {f: statistics.median(times[f]) for f in FORMS}
        faster = "ghost" if med["ghost"] < med["materialized"] else "materialized"
        scale = outs["materialized"].abs().max().item()
        rel = (outs["ghost"] - outs["materialized"]).abs().max().item() / scale
        rel_auto = (outs["auto"] - outs[pick]).abs().max().item() / scale
        rows.append({
            "d": d, "T": T, "n": n, "H": H, "layer": name, "d_in": m.d_in, "d_out": m.d_out,
            "model_mib": {"materialized": cost.materialized_bytes / MiB, "ghost": cost.ghost_bytes / MiB},
            "model_gflop": {"materialized": cost.materialized_flops / 1e9, "ghost": cost.ghost_flops / 1e9},
            "ms": {f: 1e3 * med[f] for f in FORMS},
            "peak_mib": {f: (max(mem[f]) / MiB if mem[f] else None) for f in FORMS},
            "auto_pick": pick, "faster": faster, "agree": pick == faster,
            "margin": max(med["ghost"], med["materialized"]) / min(med["ghost"], med["materialized"]),
            "max_rel_diff": rel, "auto_rel_diff": rel_auto, "repeats": repeats,
        })
        del x, dy, outs
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# Computed only (d = 4096, 8192)
# ----------------------------------------------------------------------------------------------------------------------
def computed_rows(ds=COMPUTED_DS, ts=TS, ns=NS) -> list[dict]:
    rows = []
    for d in ds:
        H = d // 64
        for T in ts:
            for n in ns:
                row = {"d": d, "T": T, "n": n, "H": H}
                for name, m in layer_pair(d, H).items():
                    c = ghost.layer_cost(n, T, m.d_in, m.d_out, m.n_units)
                    try:
                        pick = ghost.choose(m, n, T, "auto", LIMIT)
                    except ValueError:
                        pick = "none fits"
                    row[name] = {"materialized_bytes": c.materialized_bytes, "ghost_bytes": c.ghost_bytes,
                                 "materialized_flops": c.materialized_flops, "ghost_flops": c.ghost_flops,
                                 "auto": pick}
                rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# Default-config trainer runs (refresh share)
# ----------------------------------------------------------------------------------------------------------------------
def train_command(out_dir: str, steps: int) -> list[str]:
    exe = Path(sys.executable).with_name("deepspeed")
    ds = str(exe) if exe.exists() else (shutil.which("deepspeed") or "deepspeed")
    return [ds, "--num_gpus", "2", "--module", "mat_ds.pretrain", "--deepspeed_config", TRAIN_CONFIG,
            "--train_steps", str(steps), "--out_dir", out_dir]


def launch_train(out_dir: str, steps: int) -> None:
    shutil.rmtree(out_dir, ignore_errors=True)
    Path(out_dir).mkdir(parents=True)
    env = dict(os.environ, WANDB_MODE=os.environ.get("WANDB_MODE", "offline"))
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    with open(Path(out_dir) / "launch.log", "w") as log:
        proc = subprocess.run(train_command(out_dir, steps), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"error: the trainer run failed (exit {proc.returncode}); see {out_dir}/launch.log")


def read_train_run(out_dir: str) -> dict:
    rows = [json.loads(line) for line in open(Path(out_dir) / "metrics.jsonl") if line.strip()]
    steps = [r for r in rows if "perf/step_seconds" in r]
    refresh = [(r["trainer/step"], r["mat/refresh_seconds"]) for r in rows if "mat/refresh_seconds" in r]
    refresh_steps = {s for s, _ in refresh}
    plain = [r["perf/step_seconds"] for r in steps if r["trainer/step"] not in refresh_steps]
    last = steps[-1]
    return {"out_dir": out_dir, "steps": last["trainer/step"], "refresh_share": last["mat/refresh_share"],
            "refreshes": len(refresh), "refresh_seconds": [round(s, 3) for _, s in refresh],
            "refresh_steps": sorted(refresh_steps), "train_seconds": last["perf/train_seconds_cumulative"],
            "median_step_seconds": statistics.median(plain) if plain else None,
            "median_refresh_step_seconds": statistics.median([r["perf/step_seconds"] for r in steps
                                                              if r["trainer/step"] in refresh_steps] or [0.0])}


# ----------------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------------
def _f(v: Optional[float], fmt: str = ".1f") -> str:
    return "n/a" if v is None else format(v, fmt)


def _short(form: str) -> str:
    return {"materialized": "mat", "ghost": "ghost"}.get(form, form)


def measured_table(rows: list[dict]) -> list[str]:
    out = ["| d | T | n | layer | model MiB mat / ghost | peak MiB mat / ghost / auto | ms mat / ghost / auto "
           "| auto picks | faster | agree | max rel diff |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mm, pk, ms = r["model_mib"], r["peak_mib"], r["ms"]
        out.append(f"| {r['d']} | {r['T']} | {r['n']} | {r['layer']} | {mm['materialized']:.1f} / {mm['ghost']:.1f} "
                   f"| {_f(pk['materialized'])} / {_f(pk['ghost'])} / {_f(pk['auto'])} "
                   f"| {ms['materialized']:.1f} / {ms['ghost']:.1f} / {ms['auto']:.1f} | {_short(r['auto_pick'])} "
                   f"| {_short(r['faster'])} ({r['margin']:.2f}×) | {'yes' if r['agree'] else '**no**'} "
                   f"| {r['max_rel_diff']:.1e} |")
    return out


def computed_table(rows: list[dict]) -> list[str]:
    out = ["| d | H | T | n | materialized MiB qkv / out | ghost MiB | materialized GFLOP qkv / out "
           "| ghost GFLOP qkv / out | auto qkv / out |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        q, o = r["qkv"], r["out"]
        out.append(f"| {r['d']} | {r['H']} | {r['T']} | {r['n']} | {q['materialized_bytes'] / MiB:.0f} / "
                   f"{o['materialized_bytes'] / MiB:.0f} | {q['ghost_bytes'] / MiB:.0f} | "
                   f"{q['materialized_flops'] / 1e9:.0f} / {o['materialized_flops'] / 1e9:.0f} | "
                   f"{q['ghost_flops'] / 1e9:.0f} / {o['ghost_flops'] / 1e9:.0f} | {_short(q['auto'])} / "
                   f"{_short(o['auto'])} |")
    return out


def reading(result: dict) -> list[str]:
    rows = [r for r in result["measured"] if not r.get("default_shape")]
    lines = []
    agree = sum(r["agree"] for r in rows)
    lines.append(f"* **Cost model vs measurement:** `choose` picked the measured faster form in **{agree} of "
                 f"{len(rows)}** measured layers (grid cells × 2 layers; the default-config shape excluded).")
    wrong = [r for r in rows if not r["agree"]]
    if wrong:
        close = [r for r in wrong if r["margin"] < 1.15]
        to_ghost = sum(r["faster"] == "ghost" for r in wrong)
        lines.append(f"  Disagreements ({to_ghost} of {len(wrong)} picked mat where ghost was faster; d/T/n layer, "
                     "slower/faster time): " + "; ".join(
                         f"{r['d']}/{r['T']}/{r['n']} {r['layer']} {r['margin']:.2f}×" for r in wrong)
                     + f". {len(close)} of them within 15 % (near ties on a shared machine).")
    total = {f: sum(r["ms"][f] for r in rows) / 1e3 for f in FORMS}
    best = sum(min(r["ms"]["materialized"], r["ms"]["ghost"]) for r in rows) / 1e3
    lines.append(f"* **What the picks cost:** summed over the {len(rows)} layers, always-mat "
                 f"{total['materialized']:.3g} s, "
                 f"always-ghost {total['ghost']:.3g} s, auto {total['auto']:.3g} s, the faster form per layer "
                 f"{best:.3g} s (auto / best = {total['auto'] / best:.2f}).")
    wins: dict[tuple[int, int], list[str]] = {}
    for r in rows:
        if r["faster"] == "ghost":
            wins.setdefault((r["d"], r["T"]), []).append(f"{r['n']}{'' if r['layer'] == 'qkv' else '(out)'}")
    ghost_cells = "; ".join(f"d {d} T {T}: n " + ", ".join(v) for (d, T), v in sorted(wins.items()))
    mat_all = [f"at d = {d} throughout" for d in sorted({r["d"] for r in rows})
               if all(r["faster"] == "materialized" for r in rows if r["d"] == d)]
    mat_all += [f"in every T = {T} cell" for T in sorted({r["T"] for r in rows})
                if all(r["faster"] == "materialized" for r in rows if r["T"] == T)]
    lines.append(f"* **Where the ghost form wins** ({sum(len(v) for v in wins.values())} of {len(rows)} layers; "
                 "n = QKV, n(out) = output projection): " + (ghost_cells or "nowhere") + ". **Materialising wins "
                 "everywhere else**" + (" (" + ", ".join(mat_all) + ")" if mat_all else "") + ": the ghost form's "
                 "(nT)² terms grow as T², the materialised per-sample gradients as d_in·d_out. The cost model counts "
                 "FLOPs only; the materialised form also writes and reads n·d_in·d_out numbers (a unit's share at a time) and "
                 "the ghost form's "
                 "per-unit loop is elementwise work on (nT)² numbers, so it can miss near the crossover.")
    n_mem = len(lines)
    for form in ("materialized", "ghost"):
        for layer in ("qkv", "out"):
            ratios = [r["peak_mib"][form] / r["model_mib"][form] for r in rows if r["layer"] == layer
                      and r["peak_mib"][form] is not None and r["model_mib"][form] >= 16]
            if ratios:
                lines.append(f"* **Peak memory, {form}, {layer}:** measured / cost-model bytes "
                             f"{min(ratios):.2f}–{max(ratios):.2f} (median {statistics.median(ratios):.2f}, "
                             f"{len(ratios)} layers with a model figure ≥ 16 MiB).")
    if len(lines) > n_mem:
        worst_peak = max(r["peak_mib"][f] / r["model_mib"][f] for r in rows for f in ("materialized", "ghost")
                         if r["peak_mib"][f] is not None and r["model_mib"][f] >= 16)
        lines.append("  The materialised form builds one unit's per-sample gradients at a time and the ghost form "
                     "reuses one per-unit (nT)² buffer, so the model charges what the code holds; "
                     + ("every measured peak is within its figure, so `mat.probe_memory_mb` bounds the real peak."
                        if worst_peak <= 1.0 else
                        f"the largest measured peak is {worst_peak:.2f}× its figure."))
    worst = max(r["max_rel_diff"] for r in result["measured"])
    lines.append(f"* **Numerics:** the two forms agree to max |ghost − materialized| / max |materialized| ≤ "
                 f"{worst:.1e} in every measured cell (fp32); `auto` returns exactly its pick's Gram "
                 f"(max rel diff {max(r['auto_rel_diff'] for r in result['measured']):.1e}).")
    computed = result["computed"]
    forced = [r for r in computed if any(r[k]["auto"] == "ghost" and r[k]["materialized_flops"] < r[k]["ghost_flops"]
                                         for k in ("qkv", "out"))]
    big = [r["peak_mib"]["ghost"] / r["model_mib"]["ghost"] for r in rows
           if r["peak_mib"]["ghost"] is not None and r["model_mib"]["ghost"] >= 64]
    ghost_ratio = statistics.median(big) if big else None
    if computed:
        fits = {}
        for r in computed:
            if r["qkv"]["materialized_bytes"] <= LIMIT:
                fits.setdefault(r["d"], set()).add(r["n"])
        fit_text = "; ".join(f"d {d}: " + (f"n ∈ {sorted(fits[d])}" if d in fits else "never")
                             for d in sorted({r["d"] for r in computed}))
        worst = max(computed, key=lambda r: r["qkv"]["ghost_flops"] / r["qkv"]["materialized_flops"]
                    if r["qkv"]["auto"] == "ghost" else 0)
        lines.append(f"* **d = 4096 / 8192 (computed):** the 2048 MiB bound decides there. A QKV's materialised "
                     f"form (one unit's per-sample gradients at a time) fits it for {fit_text}; auto takes the ghost form in "
                     f"{sum(r[k]['auto'] == 'ghost' for r in computed for k in ('qkv', 'out'))} of "
                     f"{2 * len(computed)} layers, in {len(forced)} cells although it costs more FLOPs than "
                     + (f"materialising (largest: d {worst['d']}, T {worst['T']}, n {worst['n']} QKV, ghost "
                        f"{worst['qkv']['ghost_flops'] / 1e12:.1f} vs materialised "
                        f"{worst['qkv']['materialized_flops'] / 1e12:.1f} TFLOP). " if forced else "materialising. ")
                     + (f"With the ghost form's measured peak at ≈ {ghost_ratio:.1f}× its model figure, the "
                        f"{max(r['qkv']['ghost_bytes'] for r in computed) / MiB:.0f}-MiB ghost cells would really "
                        f"need ≈ {ghost_ratio * max(r['qkv']['ghost_bytes'] for r in computed) / 2**30:.1f} GiB. "
                        if ghost_ratio and ghost_ratio > 1.05 else "")
                     + f"Refused (both forms over the bound, a start-up error): "
                     f"{sum(r[k]['auto'] == 'none fits' for r in computed for k in ('qkv', 'out'))} layers.")
    return lines


def markdown(result: dict) -> str:
    env = result["env"]
    lines = ["# mNTK refresh cost: materialised vs ghost Gram", "",
             "Generated by `benchmarks/probe_cost.py`. Exact command:", "", "```bash",
             result["command"].strip(), "```", "",
             f"Machine: {env['cpus']} CPU cores (shared with other users; 1-min load average {env['load_before']:.1f} "
             f"before, {env['load_after']:.1f} after), {env['platform']}, torch {env['torch']} "
             f"({env['threads']} thread{'s' if env['threads'] != 1 else ''}), fp32, single process.", "",
             "## Method", "",
             "Per cell (d, T, n): one head-wise layer pair per transformer layer with H = d/64 units, QKV "
             "`HeadwiseLinear(d, 3d, H, \"out\")` and output projection `HeadwiseLinear(d, d, H, \"in\")`; random "
             "x [n, T, d_in], dy [n, T, d_out]. Forms: **mat** = `shard_unit_gram(x, dy, m, 0, rows*cols)`, "
             "**ghost** = `ghost_unit_gram(x, dy, m)`, **auto** = `choose(m, n, T, \"auto\", 2048 MiB)` then that "
             f"form. Time: one warm-up call per form, then {result['repeats_text']} rounds in which the three forms "
             "take turns (order rotated each round); medians. `faster` is the form with the lower median "
             "(its margin = slower / faster), `agree` = auto's pick is the faster one. Torch runs with "
             f"{env['threads']} thread{'s' if env['threads'] != 1 else ''} (`--threads`; with 2 OpenMP threads on "
             "this oversubscribed 2-core machine a "
             "512×512×256 matmul was 16× slower and a 2048³ one no faster). Each call starts with its memory handed "
             "back to the kernel (below), so its page faults are in its time, as in a refresh every 25 steps.", "",
             "**Peak memory is measured**, per call, as the rise of the process's resident set during the call "
             "(Linux): glibc's free memory is handed back first (`malloc_trim(0)`), the kernel's peak-RSS mark is "
             "reset (`echo 5 > /proc/self/clear_refs`), the call runs, and `VmHWM − VmRSS(before)` from "
             "`/proc/self/status` is the call's peak extra memory; the table shows the max over a form's calls. "
             "Torch's CPU allocator keeps no cache, so every intermediate tensor of the call is counted (plus "
             f"page-granularity noise). Calibration at start-up: a call that creates one 256 MiB tensor read as "
             f"{_f(result['calibration_mib'])} MiB. `model MiB` is `ghost.layer_cost`'s figure "
             "(materialised (2·n·d_in·d_out/U + nT·(d_in + d_out))·4 B: one unit's per-sample gradients, charged "
             "twice, and the activation slices; ghost (2·(nT)² + nT·max(d_in, d_out))·4 B).", "",
             "## Measured", ""]
    lines += measured_table([r for r in result["measured"] if not r.get("default_shape")])
    if result["dropped"]:
        rates = [r["model_gflop"]["ghost"] / (r["ms"]["ghost"] / 1e3) for r in result["measured"]
                 if r["model_gflop"]["ghost"] >= 20]
        slow = [max(c["gflop"].values()) for c in result["dropped"]]
        rate = (f"the ghost form ran at a median {statistics.median(rates):.0f} cost-model GFLOP/s here, so the slower "
                f"form of a dropped cell would take ≈ {min(slow) / statistics.median(rates):.0f}–"
                f"{max(slow) / statistics.median(rates):.0f} s per call, 4 or more calls per form"
                if rates else "minutes per call")
        lines += ["", f"Dropped (slower form > {result['max_gflop']:.0f} cost-model GFLOP for the pair: {rate}; "
                  "the model's pick is shown): " + "; ".join(
                      f"d {c['d']} T {c['T']} n {c['n']} (mat {c['gflop']['materialized']:.0f} / ghost "
                      f"{c['gflop']['ghost']:.0f} GFLOP, auto {'/'.join(_short(p) for p in c['auto'])})"
                      for c in result["dropped"]) + "."]
    default = [r for r in result["measured"] if r.get("default_shape")]
    if default:
        d, H, T, n = DEFAULT_SHAPE
        lines += ["", f"The default config's own layer shape (d {d}, {H} heads of {d // H}, T {T}, n {n} probe "
                  "samples), same method:", ""] + measured_table(default)
    lines += ["", "## Computed only: 7B/70B-like widths (H = d/64)", "",
              "`ghost.layer_cost` per layer (fp32), `choose(..., \"auto\", 2048 MiB)` (bytes as in the method above).",
              ""]
    lines += computed_table(result["computed"])
    lines += ["", "## Reading", ""] + reading(result)
    train = result.get("train")
    if train:
        shares = [t["refresh_share"] for t in train]
        lines += ["", "## Refresh overhead at the default config", "",
                  f"`{TRAIN_CONFIG}` unchanged (BERT 4 L × 4 H, d 128, seq 128, micro-batch 8 × 2 ranks, ZeRO-2, "
                  "MAT: warm-up 50 steps, refresh every 25, 16 probe samples, `probe_gram` auto), "
                  f"{len(train)} run(s) of {train[0]['steps']} steps, one after another:", "", "```bash",
                  " ".join(shlex.quote(a) for a in ["deepspeed"] + train_command("OUT_DIR", train[0]["steps"])[1:]),
                  "```", "",
                  "| run | refreshes (at steps) | seconds per refresh | median step s (no refresh / refresh step) "
                  "| training s | `mat/refresh_share` |",
                  "|---|---|---|---|---|---|"]
        for i, t in enumerate(train, 1):
            lines.append(f"| {i} | {t['refreshes']} ({', '.join(map(str, t['refresh_steps']))}) | "
                         f"{', '.join(f'{s:.2f}' for s in t['refresh_seconds'])} | "
                         f"{_f(t['median_step_seconds'], '.3f')} / {_f(t['median_refresh_step_seconds'], '.3f')} | "
                         f"{t['train_seconds']:.1f} | {100 * t['refresh_share']:.1f} % |")
        default = [r for r in result["measured"] if r.get("default_shape")]
        gram_note = ""
        if default:
            pair_ms = sum(r["ms"]["auto"] for r in default)
            per_refresh = pair_ms * 4 / 2  # 4 layers split over 2 ranks (split "layer")
            med_refresh = statistics.median(s for t in train for s in t["refresh_seconds"])
            gram_note = (f" The Grams themselves are a small part of it: at the default shape the auto path costs "
                         f"{pair_ms:.0f} ms per layer pair (table above, 1 thread), i.e. ≈ {per_refresh:.0f} ms per "
                         f"refresh with 4 layers over 2 ranks, against a median refresh of "
                         f"{1e3 * med_refresh:.0f} ms; the rest is the probe's forward + activation backward, "
                         "λmax, the all-reduce and the policy.")
        lines += ["", f"**Refresh share of training time: median {100 * statistics.median(shares):.1f} % "
                  f"(runs: {', '.join(f'{100 * s:.1f} %' for s in shares)}).** `mat/refresh_share` = seconds in mNTK "
                  "refreshes + policy decisions / training-loop seconds (evaluation excluded), from the trainer's "
                  "summary line; the refresh is the probe's forward + activation backward, the Grams, the one "
                  "all-reduce, λmax and the policy. Steps are the 1-based `trainer/step` of the step that ran the "
                  "refresh; refreshes inside MAT's 50-step warm-up count as well." + gram_note]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace, argv: list[str]) -> dict:
    """The benchmark; torch's thread count and grad mode are restored afterwards (it also runs inside pytest)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        with torch.no_grad():
            return _run(args, argv)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, argv: list[str]) -> dict:
    peak = PeakRSS()
    load_before = os.getloadavg()[0]
    calibration = peak.calibrate()
    if args.quick:
        cells = [c for c in QUICK_CELLS]
        default_cell = False
    else:
        cells = [(d, T, n) for d in DS for T in TS for n in NS]
        default_cell = True
    measured, dropped = [], []
    cells_run = 0
    for d, T, n in cells:
        H = d // 64
        gf = pair_gflop(d, T, n, H)
        if max(gf.values()) > args.max_gflop:
            dropped.append({"d": d, "T": T, "n": n, "gflop": gf,
                            "auto": [ghost.choose(m, n, T, "auto", LIMIT) for m in layer_pair(d, H).values()]})
            continue
        repeats = args.repeats if max(gf.values()) <= 50 else max(args.repeats - 2, 1)
        t0 = time.perf_counter()
        rows = measure_cell(d, T, n, H, repeats, peak)
        cells_run += 1
        measured += rows
        if not args.quiet:
            for line in measured_table(rows)[2:]:
                print(line, f"  [{time.perf_counter() - t0:.1f} s]", flush=True)
    if default_cell:
        d, H, T, n = DEFAULT_SHAPE
        rows = measure_cell(d, T, n, H, args.repeats, peak)
        for r in rows:
            r["default_shape"] = True
        measured += rows
    train = []
    for i in range(args.train_repeats):
        out_dir = f"{args.train_dir}/run{i + 1}"
        if not args.quiet:
            print(f"trainer run {i + 1}/{args.train_repeats} -> {out_dir}", flush=True)
        launch_train(out_dir, args.train_steps)
        train.append(read_train_run(out_dir))
    train += [read_train_run(d) for d in args.train_runs]
    full_r, short_r = args.repeats, max(args.repeats - 2, 1)
    result = {
        "command": " ".join(["python -m benchmarks.probe_cost"] + [shlex.quote(a) for a in argv]),
        "env": {"cpus": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                "platform": platform.platform(), "load_before": load_before, "load_after": os.getloadavg()[0]},
        "calibration_mib": calibration, "max_gflop": args.max_gflop,
        "repeats_text": (f"{full_r} ({short_r} where the slower form of the pair exceeds 50 cost-model GFLOP)"
                         if full_r != short_r else f"{full_r}"),
        "measured": measured, "dropped": dropped, "computed": computed_rows(), "train": train,
        "agreements": sum(r["agree"] for r in measured if not r.get("default_shape")),
        "decisions": sum(1 for r in measured if not r.get("default_shape")),
    }
    return result


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 small cells, repeats 2, no trainer run (a test).")
    parser.add_argument("--repeats", type=int, default=None, help="Timed rounds per cell (default 5; --quick 2).")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on the shared 2-core machine 2 OpenMP threads made small "
                             "GEMMs up to 16x slower, big ones no faster).")
    parser.add_argument("--max_gflop", type=float, default=450.0,
                        help="Drop cells whose slower form exceeds this many cost-model GFLOP for the layer pair.")
    parser.add_argument("--train_repeats", type=int, default=None,
                        help="Default-config trainer runs for the refresh share (default 2; --quick 0).")
    parser.add_argument("--train_steps", type=int, default=100)
    parser.add_argument("--train_dir", default="runs/probe_cost")
    parser.add_argument("--train_runs", nargs="*", default=[], help="Finished trainer run directories to report too.")
    parser.add_argument("--out", default=None, help="Markdown report (default docs/probe_cost.md; --quick: none).")
    parser.add_argument("--json", default=None,
                        help="Also save the raw result here (default runs/probe_cost/result.json; --quick: none).")
    parser.add_argument("--from_json", default=None,
                        help="Measure nothing: rebuild the report from a saved result (e.g. after editing the text).")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 2 if args.quick else 5
    if args.train_repeats is None:
        args.train_repeats = 0 if args.quick else 2
    if args.out is None and not args.quick:
        args.out = str(ROOT / "docs" / "probe_cost.md")
    if args.json is None and not args.quick and not args.from_json:
        args.json = str(ROOT / "runs" / "probe_cost" / "result.json")
    return args


def main(argv: Optional[list[str]] = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    result = json.loads(Path(args.from_json).read_text()) if args.from_json else run(args, argv)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    if not args.quiet:
        print("\n".join(measured_table(result["measured"])))
        print()
        print("\n".join(computed_table(result["computed"])))
        print()
        print("\n".join(reading(result)))
        for t in result["train"]:
            print(f"trainer {t['out_dir']}: refresh_share {t['refresh_share']:.4f}, refreshes {t['refresh_seconds']}")
        print("PROBE_COST " + json.dumps({k: result[k] for k in ("agreements", "decisions", "calibration_mib")}
                                         | {"max_rel_diff": max(r["max_rel_diff"] for r in result["measured"]),
                                            "refresh_share": [t["refresh_share"] for t in result["train"]]}),
              flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(markdown(result))
        if not args.quiet:
            print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
