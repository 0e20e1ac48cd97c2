"""A user's own loop (``mat_ds.initialize`` + ``engine.save_checkpoint`` / ``load_checkpoint``) resumed at another
data-parallel size through DeepSpeed's universal checkpoint under ZeRO-3, the way DeepSpeed documents it: convert the
tag by hand, put ``"checkpoint": {"load_universal": true}`` in the JSON, call ``engine.load_checkpoint(dir)``.
tests/test_universal.py launches it.

``--mode save`` (any DP size): HF BERT with the usual two param groups (weight decay / none), MAT freezing heads,
trains SAVE_AT steps, saves tag ``step{SAVE_AT}``, goes on to END; rank 0 writes the uninterrupted losses, MAT's state
at the save and its optimizer groups' hyperparameters to ``DIR/uninterrupted.pt``.
``--mode resume`` (any DP size; same global batch): a fresh engine loads the universal copy with DeepSpeed's own
``load_checkpoint`` (tag from ``latest_universal``) and runs to END. ``universal.fix_param_groups`` is observed, not
replaced: what the optimizer held before and after the repair is recorded (the DeepSpeed 0.19.8 defects it mends:
group 0's hyperparameters on every group, one ``step`` tensor shared by all). Rank 0 prints
``WRAPPER_UNIVERSAL {json}``.
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist

import mat_ds
from mat_ds import universal
from mat_ds.distributed import exit_process
from tests.scripts.wrapper_check import batch, bert

SAVE_AT, END, GLOBAL = 4, 8, 8
MAT = {"policy": "mat", "alpha": 0.4, "beta": 0.05, "warmup_steps": 2, "refresh_interval": 2, "probe_samples": 8}
NO_DECAY = ("bias", "LayerNorm.weight")


def config(dp: int, load_universal: bool) -> dict:
    micro = GLOBAL // dp // 2  # two micro-batches per step at every DP size: the same samples in the same order
    cfg = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 2, "steps_per_print": 10**6,
           "optimizer": {"type": "AdamW", "params": {"lr": 2e-3, "weight_decay": 0.01, "torch_adam": True}},
           "zero_optimization": {"stage": 3}, "mat": MAT}
    if load_universal:
        cfg["checkpoint"] = {"load_universal": True}
    return cfg


def global_batch(step: int, micro_index: int, dp: int, rank: int) -> dict:
    """Sample rows of step ``step``: 8 rows, fixed, split over (micro-batch, DP rank) in one order at every DP size."""
    full = batch(step, 0, micro=GLOBAL)
    # Every token a target: each micro-batch's mean loss then weighs its samples as at any other DP size.
    full["labels"] = full["input_ids"].clone()
    micro = GLOBAL // dp // 2
    start = (micro_index * dp + rank) * micro
    return {k: v[start:start + micro] for k, v in full.items()}


def build(dp: int, load_universal: bool):
    model = bert()
    groups = [{"params": [p for n, p in model.named_parameters() if not n.endswith(NO_DECAY)]},
              {"params": [p for n, p in model.named_parameters() if n.endswith(NO_DECAY)], "weight_decay": 0.0}]
    engine, *_ = mat_ds.initialize(model=model, model_parameters=groups, config=config(dp, load_universal),
                                   probe_batch=batch(99, 0, micro=8))
    return engine


def train(engine, first: int, last: int, dp: int) -> list:
    """Optimizer steps ``first``..``last``-1; each step's loss averaged over its 8 samples' micro-batches."""
    losses = []
    for step in range(first, last):
        total = torch.zeros(())
        for i in range(2):
            loss = engine(**global_batch(step, i, dp, dist.get_rank())).loss
            engine.backward(loss)
            engine.step()
            total += loss.detach()
        dist.all_reduce(total)
        losses.append(float(total) / (2 * dp))
        engine.mat.metrics()
    return losses


def optimizer_view(engine) -> dict:
    inner = engine.optimizer.optimizer
    steps = [s["step"] for s in inner.state.values() if torch.is_tensor(s.get("step"))]
    return {"weight_decay": [g["weight_decay"] for g in inner.param_groups],
            "step_values": sorted({float(t) for t in steps}), "step_tensors": len(steps),
            "distinct_step_tensors": len({id(t) for t in steps})}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int, default=-1)
    parser.add_argument("--mode", choices=["save", "resume"], required=True)
    parser.add_argument("--dir", required=True)
    args = parser.parse_args()
    mat_ds.init_distributed()
    dp = dist.get_world_size()
    rank0 = dist.get_rank() == 0
    if args.mode == "save":
        engine = build(dp, load_universal=False)
        train(engine, 0, SAVE_AT, dp)
        engine.save_checkpoint(args.dir, tag=f"step{SAVE_AT}")
        state = engine.mat.state_dict()
        tail = train(engine, SAVE_AT, END, dp)
        if rank0:
            torch.save({"losses": tail, "mat": state, "optimizer": optimizer_view(engine)},
                       os.path.join(args.dir, "uninterrupted.pt"))
            print("WRAPPER_UNIVERSAL_SAVED " + json.dumps({"dp": dp, "frozen": state["policies"]["heads"]["frozen"]}),
                  flush=True)
    else:
        seen = {}
        fix = universal.fix_param_groups

        def observed(engine, tag_dir):
            seen["before"] = optimizer_view(engine)
            fix(engine, tag_dir)
            seen["after"] = optimizer_view(engine)

        universal.fix_param_groups = observed
        engine = build(dp, load_universal=True)
        path, _ = engine.load_checkpoint(args.dir)
        loaded = engine.mat.state_dict()
        tail = train(engine, SAVE_AT, END, dp)
        if rank0:
            ref = torch.load(os.path.join(args.dir, "uninterrupted.pt"), weights_only=False)
            same_mat = json.dumps(ref["mat"]["policies"], sort_keys=True) == json.dumps(loaded["policies"],
                                                                                    sort_keys=True)
            print("WRAPPER_UNIVERSAL " + json.dumps({
                "dp": dp, "loaded": path is not None, "mat_state_equal": same_mat,
                "probe_equal": torch.equal(ref["mat"]["probe"]["batch"]["input_ids"],
                                           loaded["probe"]["batch"]["input_ids"]),
                "losses": tail, "losses_ref": ref["losses"],
                "loss_max_abs_diff": max(abs(a - b) for a, b in zip(tail, ref["losses"])),
                "repair": seen, "optimizer_end": optimizer_view(engine), "optimizer_end_ref": ref["optimizer"],
            }), flush=True)
    mat_ds.shutdown_distributed()


if __name__ == "__main__":
    main()
    exit_process(0)
