"""Side by side in ONE run: step time, forward+backward time, gradient-communication bytes and analytic FLOPs per step
with no unit frozen vs fractions of the heads (and, with ``--mlp_groups``, of the MLP units) frozen.

    deepspeed --num_gpus 2 benchmarks/freeze_speed.py --deepspeed_config configs/bert_mat_zero2.json \
        --frozen_fractions 0.25 0.5 0.75 1 --rounds 6 --steps_per_round 10
    OMP_NUM_THREADS=1 deepspeed --num_gpus 1 benchmarks/freeze_speed.py --deepspeed_config configs/bert_mat_zero2.json \
        --mlp_groups 4 --name converge --out docs/mlp_units_speed.md ...   # MLP units: docs/mlp_units_speed.md
    python benchmarks/freeze_speed.py --report_only --out docs/mlp_units_speed.md   # redraw the page from the records

Arms: ``full`` (nothing frozen), ``full_again`` (nothing frozen either: the same-vs-same control, whose ratio to
``full`` is the noise floor of every other ratio), and per frozen fraction f ``heads_{f}`` (the first round(f·H) heads
of every layer frozen). With ``--mlp_groups G`` the dense MLPs are converted too (``"modules": ["heads", "mlp"]``,
``"mlp_groups": G``) and two more kinds of arm run: ``heads_mlp_{f}`` (the same heads AND the first round(f·G) MLP
units of every layer frozen) and ``unconverted``: a SECOND engine, built the same way from a copy of the same initial
model but with ``"modules": ["heads"]`` (its MLPs stay plain ``nn.Linear``), nothing frozen; its forward+backward time
over the converted engine's ``full`` arm is the cost of converting the MLPs. Both engines take part in the same
rotation, on the same batch stream.

Blocks of ``steps_per_round`` steps rotate through the arms, the order shifted by one each round, so that drift in
machine load hits every arm alike; round 0 is a warm-up and is dropped. A step's batches are built before its timer
starts (the time is the engine's: forward, backward, optimizer step; ``fwd+bwd`` stops before ``engine.step()``), in
wall seconds and in process CPU seconds (``time.process_time``: with one torch thread it leaves out the time the
process waited for a core on a shared machine). Reported per arm: median seconds and their ratios to ``full`` (ratio
of medians, plus the range of the per-round ratios), gradient bytes per step (DeepSpeed's comms logger) against the
frozen parameters' bytes, and the analytic FLOPs per step (``FlopsModel.train_step``) and its ratio to ``full``.
Timings are printed and written, never asserted. ``--record`` keeps the raw per-step timings as JSON (default
``benchmarks/records/freeze_speed/NAME.json``); ``--out`` renders a markdown page from every record in that directory.
The report math (``summarize``, ``render_page``) is pure and unit-tested in ``tests/test_freeze_speed.py``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT / "benchmarks" / "records" / "freeze_speed"
CONTROL = "full_again"
# Per step: wall seconds and process CPU seconds (with one torch thread, the CPU time leaves out the time the process
# waited for a core on a shared machine), of the whole step and of forward+backward only.
METRICS = ("step_s", "step_cpu_s", "fwd_bwd_s", "fwd_bwd_cpu_s")


# ----------------------------------------------------------------------------------------------------------------------
# Arms and report math (pure: tests/test_freeze_speed.py)
# ----------------------------------------------------------------------------------------------------------------------
def arm_specs(fractions: list[float], n_head: int, mlp_groups: Optional[int]) -> dict[str, dict]:
    """Arm name -> {"engine": "converted"|"unconverted", "heads": frozen heads per layer, "mlp": frozen MLP units per
    layer}, in rotation order."""
    none = {"engine": "converted", "heads": 0, "mlp": 0}
    arms = {"full": dict(none), CONTROL: dict(none)}
    for f in fractions:
        arms[f"heads_{f:g}"] = {"engine": "converted", "heads": round(f * n_head), "mlp": 0}
        if mlp_groups:
            arms[f"heads_mlp_{f:g}"] = {"engine": "converted", "heads": round(f * n_head), "mlp": round(f * mlp_groups)}
    if mlp_groups:
        arms["unconverted"] = {"engine": "unconverted", "heads": 0, "mlp": 0}
    return arms


def unit_mask(units: list, heads: int, mlp: int) -> torch.Tensor:
    """Freezer mask in ``units.all()`` order: the first ``heads`` heads and first ``mlp`` MLP units of every layer."""
    limit = {"heads": heads, "mlp": mlp}
    return torch.tensor([u.index < limit.get(u.kind, 0) for u in units], dtype=torch.bool)


def arm_flops(flops, tokens: int, n_layer: int, spec: dict, mlp_groups: Optional[int]) -> int:
    """FLOPs of one step of an arm (``FlopsModel.train_step``): ``spec``'s per-layer frozen heads and MLP units in every
    layer. Converting the MLPs changes no FLOPs, so ``unconverted`` costs what ``full`` does."""
    return flops.train_step(tokens, n_frozen_heads=n_layer * spec["heads"], n_frozen_mlp=n_layer * spec["mlp"],
                            mlp_groups=mlp_groups or 1)


def median_ratio(times: list[float], ref: list[float]) -> float:
    return statistics.median(times) / statistics.median(ref)


def round_ratios(rounds: list[list[float]], ref_rounds: list[list[float]]) -> list[float]:
    """Per round: median of the arm's block over the median of ``full``'s block in the same round."""
    return [statistics.median(a) / statistics.median(b) for a, b in zip(rounds, ref_rounds) if a and b]


def summarize(record: dict) -> dict:
    """Per-arm medians and ratios from a record's raw timings (lists of per-round lists of step seconds)."""
    arms = record["arms"]
    full = arms["full"]
    metrics = [k for k in METRICS if k in full]
    flat = {a: {k: [t for r in v[k] for t in r] for k in metrics} for a, v in arms.items()}
    out = {}
    for arm, v in arms.items():
        row = {"engine": v["engine"], "frozen_heads": v["frozen_heads"], "frozen_mlp": v["frozen_mlp"],
               "samples": len(flat[arm]["step_s"]), "flops_per_step": v["flops_per_step"],
               "flops_ratio": v["flops_per_step"] / full["flops_per_step"]}
        for k in metrics:
            row[k] = statistics.median(flat[arm][k])
            row[k + "_ratio"] = median_ratio(flat[arm][k], flat["full"][k])
            per_round = round_ratios(v[k], full[k])
            row[k + "_round_range"] = (min(per_round), max(per_round)) if per_round else (None, None)
        if v.get("grad_comm_bytes"):
            row["grad_comm_bytes"] = statistics.median(v["grad_comm_bytes"])
        row["frozen_param_bytes"] = v.get("frozen_param_bytes", 0)
        out[arm] = row
    result = {"arms": out, "metrics": metrics, "control": {k: out[CONTROL][k + "_ratio"] for k in metrics}}
    if "unconverted" in out:  # t(unconverted) / t(converted): the converted model's speed relative to plain (>= 0.95)
        result["converted_speed"] = {k: out["unconverted"][k] / out["full"][k] for k in metrics}
    return result


TABLE_METRICS = ("step_s", "step_cpu_s", "fwd_bwd_cpu_s")  # the page's table; all METRICS in the lines below it
LABEL = {"step_s": "step wall", "step_cpu_s": "step CPU", "fwd_bwd_s": "fwd+bwd wall", "fwd_bwd_cpu_s": "fwd+bwd CPU"}


def _range(lo, hi) -> str:
    return "–" if lo is None else f"{lo:.2f}–{hi:.2f}"


def render_section(record: dict) -> list[str]:
    s = summarize(record)
    m, mach, metrics = record["model"], record["machine"], s["metrics"]
    columns = [k for k in TABLE_METRICS if k in metrics]
    g = record.get("mlp_groups")
    lines = [f"## {record['name']}: {m['n_layer']} layers × {m['n_head']} heads, d {m['d_model']}, d_ff {m['d_ff']}, "
             f"seq {m['seq_len']}, vocab {m['vocab_size']}, micro-batch {record['micro_batch']}"
             + (f", {g} MLP units per layer" if g else ""), "",
             "```bash", record["command"], "```", "",
             f"{mach['cpu']}; {mach['accelerator']}, {record['world_size']} rank(s), {mach['torch_threads']} torch "
             f"thread(s), torch {mach['torch']}, deepspeed {mach['deepspeed']}; ZeRO stage {record['zero_stage']}, "
             f"{record['arch']} objective ({record['objective']}), {record['tokens_per_step']} tokens per step. "
             f"{record['rounds'] - 1} measured rounds × {record['steps_per_round']} steps = "
             f"**{s['arms']['full']['samples']} samples per arm** (round 0 warm-up dropped); load average "
             f"{mach['load_start']:.2f} at the start, {mach['load_end']:.2f} at the end; wall time "
             f"{record['wall_s']:.0f} s." + (f" {record['note']}" if record.get("note") else ""), "",
             "| arm | frozen heads | frozen MLP units | "
             + " | ".join(f"{LABEL[k]} s | ÷ full | (rounds)" for k in columns) + " | GFLOP/step | FLOPs ÷ full |",
             "|---|---:|---:|" + "---:|---:|---:|" * len(columns) + "---:|---:|"]
    for arm, r in s["arms"].items():
        cells = [f"{r[k]:.4f} | {r[k + '_ratio']:.3f} | {_range(*r[k + '_round_range'])}" for k in columns]
        lines.append(f"| `{arm}` | {r['frozen_heads']} | {r['frozen_mlp']} | " + " | ".join(cells)
                     + f" | {r['flops_per_step'] / 1e9:.3f} | {r['flops_ratio']:.3f} |")
    lines += ["", f"Control (`{CONTROL}` ÷ `full`, the noise floor): "
              + ", ".join(f"{LABEL[k]} **{s['control'][k]:.3f}**" for k in metrics) + "."]
    if "converted_speed" in s:
        lines.append("Converted vs unconverted MLPs, t(`unconverted`) ÷ t(`full`) (≥ 0.95 is the target: the "
                     "converted model at least 95 % as fast): "
                     + ", ".join(f"{LABEL[k]} **{s['converted_speed'][k]:.3f}**" for k in metrics) + ".")
    return lines + [""]


def render_page(records: list[dict], source: str = "benchmarks/records/freeze_speed/") -> str:
    lines = ["# MLP units: step time and FLOPs, heads frozen vs heads + MLP units frozen", "",
             f"Generated by `benchmarks/freeze_speed.py` from the raw timings in `{source}` "
             "(numbers computed, not edited; redraw with `python benchmarks/freeze_speed.py --report_only --out "
             "docs/mlp_units_speed.md`). One run per model, every arm in the same process through the real engine "
             "(`mat_ds.initialize`, `engine.mat.freezer.apply`), blocks of steps rotating through the arms, the order "
             "shifted by one each round. `heads_f`: the first round(f·H) heads of every layer frozen, MLP units all "
             "train; `heads_mlp_f`: the same heads and the first round(f·G) MLP units of every layer frozen; "
             "`full_again`: nothing frozen, the same-vs-same control; `unconverted`: a second engine on a copy of the "
             "same initial model with `\"modules\": [\"heads\"]`, i.e. plain `nn.Linear` MLPs, nothing frozen. "
             "Ratios are ratios of medians over all samples; (rounds) is the range of the per-round ratios (block "
             "median ÷ `full`'s block median in the same round). FLOPs are `FlopsModel.train_step` (matmuls only; a "
             "frozen unit skips its dW). CPU columns: the process's CPU seconds (`time.process_time`, one torch "
             "thread), which leave out the time the process waited for a core; the wall columns include it. Timings "
             "are printed and written, never asserted.", ""]
    for record in records:
        lines += render_section(record)
    return "\n".join(lines)


def load_records(directory: Path) -> list[dict]:
    records = [json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))]
    return sorted(records, key=lambda r: (r["model"]["d_model"], r["name"]))


# ----------------------------------------------------------------------------------------------------------------------
# Measurement (under the deepspeed launcher)
# ----------------------------------------------------------------------------------------------------------------------
def machine_info(load_start: float) -> dict:
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    acc = get_accelerator().device_name()
    if acc != "cpu" and torch.cuda.is_available():
        acc = torch.cuda.get_device_name()
    return {"cpu": f"{cpu} ({os.cpu_count()} cores)", "accelerator": acc, "torch_threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "torch": torch.__version__,
            "deepspeed": deepspeed.__version__, "load_start": load_start, "load_end": os.getloadavg()[0]}


def command_line(argv: list[str], world: int) -> str:
    args = [a for a in argv if not a.startswith("--local_rank")]
    env = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    return f"{env}deepspeed --num_gpus {world} benchmarks/freeze_speed.py " + " ".join(shlex.quote(a) for a in args)


def measure(args: argparse.Namespace) -> Optional[dict]:
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    import mat_ds
    from mat_ds.config import from_cli, load_deepspeed_config
    from mat_ds.core.freezing import GRADIENT_OPS, comm_bytes_snapshot
    from mat_ds.data import global_positions, make_batch, prepare_data
    from mat_ds.models.flops import FlopsModel
    from mat_ds.models.transformer import Transformer
    from mat_ds.train import deepspeed_config

    load_start, wall0 = os.getloadavg()[0], time.perf_counter()
    mat_ds.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    ds_file = load_deepspeed_config(args.deepspeed_config)
    if args.micro_batch:
        ds_file["train_micro_batch_size_per_gpu"] = args.micro_batch
    model_cfg, data_cfg, run_cfg = from_cli(args, ds_file)
    data = prepare_data(data_cfg, is_main=rank == 0, barrier=dist.barrier)
    torch.manual_seed(run_cfg.seed)
    model = Transformer(model_cfg, data.tokenizer.vocab_size, data_cfg.seq_len)
    H, G = model_cfg.n_head, args.mlp_groups
    specs = arm_specs(args.frozen_fractions, H, G)
    steps_total = len(specs) * args.rounds * args.steps_per_round
    ds_config = deepspeed_config(ds_file, steps_total, comm_stats=True)
    weight_decay = float(ds_config["optimizer"].get("params", {}).get("weight_decay", 0.0))

    def build(m, mat: dict):
        # The wrapper with policy "full" never freezes by itself: this benchmark sets the frozen set through the
        # engine's own FreezeController (engine.mat.freezer), the same object MAT's policies drive.
        cfg = dict(ds_config, mat=mat)
        return mat_ds.initialize(model=m, model_parameters=m.param_groups(weight_decay), config=cfg)[0]

    plain = copy.deepcopy(model) if G else None  # same initial weights, MLPs left as nn.Linear
    engines = {"converted": build(model, {"policy": "full", "modules": ["heads", "mlp"], "mlp_groups": G} if G
                                  else {"policy": "full"})}
    if G:
        engines["unconverted"] = build(plain, {"policy": "full"})
    engine = engines["converted"]
    micro, accum = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
    units = engine.mat.units.all()
    masks = {a: unit_mask(units, s["heads"], s["mlp"]) for a, s in specs.items()}
    arms = list(specs)
    raw = {a: {**{k: [] for k in METRICS}, "grad_comm_bytes": []} for a in arms}
    sync = get_accelerator().synchronize
    objective = "mlm" if model_cfg.arch == "bert" else "clm"
    step = 0
    for rnd in range(args.rounds):
        for arm in arms[rnd % len(arms):] + arms[:rnd % len(arms)]:  # rotated: no arm always follows the same one
            eng = engines[specs[arm]["engine"]]
            if eng is engine:  # the unconverted engine never freezes anything
                eng.mat.freezer.apply(masks[arm])
            block = {k: [] for k in METRICS}
            for _ in range(args.steps_per_round):
                batches = [make_batch(data.train, global_positions(step, i, rank, world, micro, accum),
                                      objective=objective, tokenizer=data.tokenizer,
                                      mlm_probability=data_cfg.mlm_probability, seed=run_cfg.seed)
                           for i in range(accum)]
                before = comm_bytes_snapshot()
                dist.barrier()
                sync()
                fb, fb_cpu, t0, c0 = 0.0, 0.0, time.perf_counter(), time.process_time()
                for batch in batches:
                    t1, c1 = time.perf_counter(), time.process_time()
                    eng.backward(eng(batch["input_ids"].to(eng.device), batch["labels"].to(eng.device)))
                    sync()
                    fb, fb_cpu = fb + time.perf_counter() - t1, fb_cpu + time.process_time() - c1
                    eng.step()
                sync()
                dist.barrier()
                elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
                after = comm_bytes_snapshot()
                step += 1
                for k, v in zip(METRICS, (elapsed, cpu, fb, fb_cpu)):
                    block[k].append(round(v, 6))
                if rnd > 0:
                    raw[arm]["grad_comm_bytes"].append(
                        sum(after[op] - before.get(op, 0) for op in after if op in GRADIENT_OPS))
            if rnd > 0:  # round 0 warms every arm up
                for k in METRICS:
                    raw[arm][k].append(block[k])

    record = None
    if rank == 0:
        flops = FlopsModel.for_run(model_cfg, data.tokenizer.vocab_size, data_cfg.seq_len, data_cfg.mlm_probability)
        tokens = micro * accum * world * data_cfg.seq_len
        L = model_cfg.n_layer
        for arm, s in specs.items():
            frozen = [u for u, f in zip(units, masks[arm].tolist()) if f] if s["engine"] == "converted" else []
            raw[arm].update(engine=s["engine"], frozen_heads=L * s["heads"], frozen_mlp=L * s["mlp"],
                            frozen_param_bytes=sum(p.numel() * p.element_size() for u in frozen for p in u.params),
                            flops_per_step=arm_flops(flops, tokens, L, s, G))
        record = {
            "name": args.name, "command": command_line(args.argv, world), "note": args.note,
            "machine": machine_info(load_start), "world_size": world, "zero_stage": engine.zero_optimization_stage(),
            "model": {"n_layer": L, "n_head": H, "d_model": model_cfg.d_model, "d_ff": model_cfg.d_ff,
                      "seq_len": data_cfg.seq_len, "vocab_size": data.tokenizer.vocab_size},
            "arch": model_cfg.arch, "objective": objective + (f", mask probability {data_cfg.mlm_probability:g}"
                                                               if objective == "mlm" else ""),
            "micro_batch": micro, "accum": accum, "tokens_per_step": tokens, "mlp_groups": G,
            "rounds": args.rounds, "steps_per_round": args.steps_per_round,
            "param_bytes_total": sum(p.numel() * p.element_size() for p in model.parameters()),
            "wall_s": round(time.perf_counter() - wall0, 1), "arms": raw,
        }
    mat_ds.shutdown_distributed()
    return record


def print_summary(record: dict) -> None:
    s = summarize(record)
    print("FREEZE_SPEED " + json.dumps({"name": record["name"], **{k: v for k, v in s.items() if k != "arms"}}),
          flush=True)
    for arm, r in s["arms"].items():
        print(f"{arm:15s} heads {r['frozen_heads']:3d} mlp {r['frozen_mlp']:3d}  "
              + "  ".join(f"{LABEL[k]} {r[k]:.4f} s ({r[k + '_ratio']:.3f})" for k in s["metrics"])
              + f"  FLOPs ratio {r['flops_ratio']:.3f}  grad bytes {r.get('grad_comm_bytes', 0):.0f} "
              f"(frozen params {r['frozen_param_bytes']})", flush=True)


def main(argv: Optional[list[str]] = None) -> Optional[dict]:
    from mat_ds.config import add_cli_arguments

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deepspeed_config", default=None, help="required unless --report_only")
    parser.add_argument("--local_rank", type=int, default=-1)
    parser.add_argument("--frozen_fractions", type=float, nargs="+", default=[0.25, 0.5, 0.75],
                        help="Share of each layer's heads (and MLP units) frozen, one arm per value (in (0, 1]).")
    parser.add_argument("--mlp_groups", type=int, default=None,
                        help="Convert the MLPs into this many MAT units per layer: adds heads_mlp_* and unconverted.")
    parser.add_argument("--micro_batch", type=int, default=None, help="Override train_micro_batch_size_per_gpu.")
    parser.add_argument("--rounds", type=int, default=6, help="Rounds; each runs one block of every arm.")
    parser.add_argument("--steps_per_round", type=int, default=10)
    parser.add_argument("--name", default="run", help="Record name (the page's section title).")
    parser.add_argument("--note", default="", help="Free text for the page, e.g. what else loaded the machine.")
    parser.add_argument("--record", default=None,
                        help=f"Raw timings JSON (default {RECORDS.relative_to(ROOT)}/NAME.json)")
    parser.add_argument("--out", default=None, help="Markdown page rendered from every record in the record's folder.")
    parser.add_argument("--report_only", action="store_true", help="No measurement: redraw --out from the records.")
    add_cli_arguments(parser)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    record_path = Path(args.record) if args.record else RECORDS / f"{args.name}.json"
    if not args.report_only:
        if not args.deepspeed_config:
            raise SystemExit("error: --deepspeed_config is required (or --report_only)")
        if any(not 0 < f <= 1 for f in args.frozen_fractions):
            raise SystemExit("error: --frozen_fractions must be in (0, 1]")
        if args.rounds < 2:
            raise SystemExit("error: --rounds must be >= 2 (round 0 is a warm-up)")
        record = measure(args)
        if record is None:  # not rank 0
            return None
        print_summary(record)
        record_path.parent.mkdir(parents=True, exist_ok=True)
        record_path.write_text(json.dumps(record, separators=(",", ":")) + "\n")
    if args.out:
        folder = record_path.parent.resolve()
        source = f"{folder.relative_to(ROOT)}/" if folder.is_relative_to(ROOT) else f"{folder}/"
        Path(args.out).write_text(render_page(load_records(folder), source), encoding="utf-8")
    return None


if __name__ == "__main__":
    main()
    from mat_ds.distributed import exit_process

    exit_process(0)  # no interpreter teardown after the work is done: see mat_ds.distributed.exit_process
