"""Side by side in ONE run: step time and gradient-communication bytes with no head frozen vs fractions frozen.

    deepspeed --num_gpus 2 benchmarks/freeze_speed.py --deepspeed_config configs/bert_mat_zero2.json \
        --frozen_fractions 0.25 0.5 0.75 1 --rounds 6 --steps_per_round 10

Arms: ``full`` (nothing frozen), ``full_again`` (nothing frozen either: the same-vs-same control, whose ratio to
``full`` is the noise floor of every other ratio), and one arm per frozen fraction f (the first round(f·H) heads of
every layer frozen). Blocks of ``steps_per_round`` steps rotate through the arms, the order shifted by one each round,
so that drift in machine load hits every arm alike; round 0 is a warm-up and is dropped. Reported per arm: median
step seconds and its ratio to ``full``, gradient bytes per step (DeepSpeed's comms logger) and the drop compared with
the frozen parameters' bytes, and the analytic FLOPs ratio. Timings are printed, never asserted.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.distributed as dist

import mat_ds
from mat_ds.config import add_cli_arguments, from_cli, load_deepspeed_config
from mat_ds.core.freezing import GRADIENT_OPS, comm_bytes_snapshot
from mat_ds.data import global_positions, make_batch, prepare_data
from mat_ds.distributed import exit_process
from mat_ds.models.flops import FlopsModel
from mat_ds.models.transformer import Transformer
from mat_ds.train import deepspeed_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deepspeed_config", required=True)
    parser.add_argument("--local_rank", type=int, default=-1)
    parser.add_argument("--frozen_fractions", type=float, nargs="+", default=[0.5],
                        help="Share of each layer's heads frozen, one arm per value (in (0, 1]).")
    parser.add_argument("--rounds", type=int, default=6, help="Rounds; each runs one block of every arm.")
    parser.add_argument("--steps_per_round", type=int, default=10)
    add_cli_arguments(parser)
    args = parser.parse_args()

    mat_ds.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    ds_file = load_deepspeed_config(args.deepspeed_config)
    model_cfg, data_cfg, run_cfg = from_cli(args, ds_file)
    data = prepare_data(data_cfg, is_main=rank == 0, barrier=dist.barrier)
    torch.manual_seed(run_cfg.seed)
    model = Transformer(model_cfg, data.tokenizer.vocab_size, data_cfg.seq_len)
    steps_total = 2 * args.rounds * args.steps_per_round
    ds_config = deepspeed_config(ds_file, steps_total, comm_stats=True)
    # The wrapper with policy "full" never freezes by itself: this benchmark sets the frozen set through the engine's
    # own FreezeController (engine.mat.freezer), the same object MAT's policies drive.
    ds_config["mat"] = {"policy": "full"}
    weight_decay = float(ds_config["optimizer"].get("params", {}).get("weight_decay", 0.0))
    engine, _, _, _ = mat_ds.initialize(model=model, model_parameters=model.param_groups(weight_decay),
                                        config=ds_config)
    micro, accum = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
    freezer, units = engine.mat.freezer, engine.mat.units

    H = model_cfg.n_head
    if any(not 0 < f <= 1 for f in args.frozen_fractions):
        raise SystemExit("error: --frozen_fractions must be in (0, 1]")
    none = torch.zeros(len(units.all()), dtype=torch.bool)
    masks = {"full": none, "full_again": none}  # one entry per freezer module: heads (layer-major), then experts
    for f in args.frozen_fractions:
        masks[f"frozen_{f:g}"] = torch.tensor([u.kind == "heads" and u.index < round(f * H) for u in units.all()])
    arms = list(masks)
    times: dict[str, list[float]] = {a: [] for a in arms}
    comm: dict[str, list[int]] = {a: [] for a in arms}  # gradient reductions only
    comm_all: dict[str, list[int]] = {a: [] for a in arms}  # every deepspeed.comm op (incl. ZeRO all-gathers)
    step = 0
    for rnd in range(args.rounds):
        for arm in arms[rnd % len(arms):] + arms[:rnd % len(arms)]:  # rotated: no arm always follows the same one
            freezer.apply(masks[arm])
            for i in range(args.steps_per_round):
                before = comm_bytes_snapshot()
                dist.barrier()
                t0 = time.perf_counter()
                for micro_step in range(accum):
                    pos = global_positions(step, micro_step, rank, world, micro, accum)
                    batch = make_batch(data.train, pos, objective="mlm" if model_cfg.arch == "bert" else "clm",
                                       tokenizer=data.tokenizer, mlm_probability=data_cfg.mlm_probability,
                                       seed=run_cfg.seed)
                    loss = engine(batch["input_ids"], batch["labels"])
                    engine.backward(loss)
                    engine.step()
                dist.barrier()
                elapsed = time.perf_counter() - t0
                after = comm_bytes_snapshot()
                step += 1
                if rnd > 0:  # round 0 warms every arm up
                    times[arm].append(elapsed)
                    comm[arm].append(sum(after[op] - before.get(op, 0) for op in after if op in GRADIENT_OPS))
                    comm_all[arm].append(sum(after.values()) - sum(before.values()))

    if rank == 0:
        flops = FlopsModel.for_run(model_cfg, data.tokenizer.vocab_size, data_cfg.seq_len,
                                   data_cfg.mlm_probability)
        t_full, c_full = statistics.median(times["full"]), statistics.median(comm["full"])
        per_arm = {}
        for arm in arms:
            frozen_units = [u for u, f in zip(units.all(), masks[arm].tolist()) if f]
            t, c = statistics.median(times[arm]), statistics.median(comm[arm])
            per_arm[arm] = {
                "frozen_heads": len(frozen_units), "step_s": round(t, 5), "step_time_ratio": round(t / t_full, 4),
                "grad_comm_bytes": c, "grad_comm_ratio": round(c / c_full, 4) if c_full else None,
                "grad_comm_drop_bytes": c_full - c,
                "frozen_param_bytes": sum(p.numel() * p.element_size() for u in frozen_units for p in u.params),
                "all_comm_bytes": statistics.median(comm_all[arm]),
                "flops_ratio_analytic": round(flops.train_per_token(len(frozen_units)) / flops.train_per_token(0), 4),
            }
        result = {
            "world_size": world, "zero_stage": engine.zero_optimization_stage(),
            "model": f"{model_cfg.n_layer}L d{model_cfg.d_model} {H}h vocab{data.tokenizer.vocab_size} T{data_cfg.seq_len}",
            "heads": len(units.heads), "samples_per_arm": len(times["full"]),
            "control_ratio": per_arm["full_again"]["step_time_ratio"],  # same vs same: the noise floor
            "param_bytes_total": sum(p.numel() * p.element_size() for p in model.parameters()),
            "arms": per_arm,
        }
        print("FREEZE_SPEED " + json.dumps(result), flush=True)
        for arm, r in per_arm.items():
            print(f"{arm:12s} heads frozen {r['frozen_heads']:3d}  step {r['step_s']:.4f} s  ratio "
                  f"{r['step_time_ratio']:.3f}  FLOPs ratio {r['flops_ratio_analytic']:.3f}  grad bytes drop "
                  f"{r['grad_comm_drop_bytes']} (frozen params {r['frozen_param_bytes']})", flush=True)
    mat_ds.shutdown_distributed()


if __name__ == "__main__":
    main()
    exit_process(0)  # no interpreter teardown after the work is done: see mat_ds.distributed.exit_process
