"""Side by side in ONE run: step time and gradient-communication bytes with no head frozen vs a fraction frozen.

    deepspeed --num_gpus 2 benchmarks/freeze_speed.py --deepspeed_config configs/bert_mat_zero2.json \
        --frozen_fraction 0.5 --rounds 6 --steps_per_round 10

Blocks of ``steps_per_round`` steps alternate between "full" and "frozen" (the same half of the heads in every layer)
so that drift in machine load hits both arms alike; the first block of each arm is a warm-up and is dropped. Reported:
median step seconds per arm and their ratio, gradient bytes per step per arm (DeepSpeed's comms logger) and the drop
compared with the frozen parameters' bytes, and the analytic FLOPs ratio. Timings are printed, never asserted.
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
    parser.add_argument("--frozen_fraction", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=6, help="A/B rounds (each: one full block, one frozen block).")
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
    n_frozen_per_layer = round(args.frozen_fraction * H)
    # One entry per freezer module: heads (layer-major), then experts (never frozen here).
    frozen_mask = torch.tensor([u.kind == "heads" and u.index < n_frozen_per_layer for u in units.all()])
    none = torch.zeros_like(frozen_mask)
    frozen_heads = [u for u, f in zip(units.all(), frozen_mask.tolist()) if f]

    times: dict[str, list[float]] = {"full": [], "frozen": []}
    comm: dict[str, list[int]] = {"full": [], "frozen": []}  # gradient reductions only
    comm_all: dict[str, list[int]] = {"full": [], "frozen": []}  # every deepspeed.comm op (incl. ZeRO all-gathers)
    step = 0
    for rnd in range(args.rounds):
        for arm, mask in (("full", none), ("frozen", frozen_mask)):
            freezer.apply(mask)
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
                if rnd > 0:  # round 0 warms both arms up
                    times[arm].append(elapsed)
                    comm[arm].append(sum(after[op] - before.get(op, 0) for op in after if op in GRADIENT_OPS))
                    comm_all[arm].append(sum(after.values()) - sum(before.values()))

    if rank == 0:
        flops = FlopsModel.for_run(model_cfg, data.tokenizer.vocab_size, data_cfg.seq_len,
                                   data_cfg.mlm_probability)
        t_full, t_frozen = statistics.median(times["full"]), statistics.median(times["frozen"])
        c_full, c_frozen = statistics.median(comm["full"]), statistics.median(comm["frozen"])
        frozen_bytes = sum(p.numel() for u in frozen_heads for p in u.params) * 4
        result = {
            "world_size": world, "zero_stage": engine.zero_optimization_stage(),
            "model": f"{model_cfg.n_layer}L d{model_cfg.d_model} {H}h vocab{data.tokenizer.vocab_size} T{data_cfg.seq_len}",
            "frozen_heads": len(frozen_heads), "heads": len(units.heads),
            "step_s_full": round(t_full, 5), "step_s_frozen": round(t_frozen, 5),
            "step_time_ratio": round(t_frozen / t_full, 4),
            "grad_comm_bytes_full": c_full, "grad_comm_bytes_frozen": c_frozen,
            "grad_comm_ratio": round(c_frozen / c_full, 4) if c_full else None,
            "grad_comm_drop_bytes": c_full - c_frozen, "frozen_param_bytes": frozen_bytes,
            "all_comm_bytes_full": statistics.median(comm_all["full"]),
            "all_comm_bytes_frozen": statistics.median(comm_all["frozen"]),
            "param_bytes_total": sum(p.numel() for p in model.parameters()) * 4,
            "flops_ratio_analytic": round(flops.train_per_token(len(frozen_heads)) / flops.train_per_token(0), 4),
            "samples_per_arm": len(times["full"]),
        }
        print("FREEZE_SPEED " + json.dumps(result), flush=True)
    mat_ds.shutdown_distributed()


if __name__ == "__main__":
    main()
    exit_process(0)  # no interpreter teardown after the work is done: see mat_ds.distributed.exit_process
