"""Multi-rank check of ``mat_ds.core.freezing`` on real DeepSpeed engines, one ZeRO stage after another in ONE
process.

    deepspeed --num_gpus 2 tests/scripts/freeze_check.py --stages 0,1,2,3

Per stage, on a toy model with per-"head" parameters (sizes chosen so parameters straddle ZeRO partition boundaries and,
under ZeRO-3, several optimizer sub-groups; one frozen head sits in the no-decay parameter group):

* guarded run: 2 steps all trainable, freeze heads {1, 3}, 3 steps, unfreeze, 1 step. Records whether frozen weights
  (full values; gathered under ZeRO-3) and their Adam-state fragments stayed bit-identical, whether the other weights
  moved, whether the re-activated heads move again, whether both ranks hold identical weights at the end, and the bytes
  per communication op of each step (DeepSpeed comms logger).
* unguarded run (``guard=False``: only ``requires_grad`` is toggled): same schedule up to the 3 frozen steps; records
  how far the "frozen" weights moved anyway.

Engines come from ``mat_ds.initialize`` with no ``"mat"`` block (plain DeepSpeed); the script drives
``FreezeController`` itself. Rank 0 prints one line ``FREEZE_CHECK {json}`` per stage.
"""
from __future__ import annotations

import argparse
import json
import math
import tempfile

import deepspeed
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import mat_ds
from mat_ds.core.freezing import GRADIENT_OPS, FreezeController, comm_bytes_snapshot
from mat_ds.distributed import exit_process, init_distributed, shutdown_distributed

D, K, N_HEADS, MICRO, ACCUM = 13, 7, 4, 8, 2
FROZEN = [1, 3]
LR, WD = 1e-2, 0.1


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(K, D) * 0.3)
        self.w_out = nn.Parameter(torch.randn(D, K) * 0.3)

    def forward(self, h):
        return torch.tanh(h @ self.w_in.t()) @ self.w_out.t()


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(D, D)
        self.heads = nn.ModuleList(Head() for _ in range(N_HEADS))
        self.out = nn.Linear(D, 3)

    def forward(self, x, y):
        h = torch.tanh(self.inp(x))
        h = h + sum(head(h) for head in self.heads)
        return F.mse_loss(self.out(h), y)

    def head_modules(self):
        return [[hd.w_in, hd.w_out] for hd in self.heads]

    def param_groups(self):
        """Two groups (so ZeRO-1/2 have two flat partitions); the last head lives in the no-decay group."""
        last = {id(p) for p in self.head_modules()[-1]}
        decay = [p for n, p in self.named_parameters() if p.dim() == 2 and id(p) not in last]
        rest = [p for n, p in self.named_parameters() if not (p.dim() == 2 and id(p) not in last)]
        return [{"params": decay, "weight_decay": WD}, {"params": rest, "weight_decay": 0.0}]


def ds_config(stage: int) -> dict:
    zero = {"stage": stage}
    if stage == 3:  # really partition every parameter, and split the optimizer into several sub-groups
        zero.update({"stage3_param_persistence_threshold": 0, "sub_group_size": 150})
    return {
        "train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": ACCUM, "gradient_clipping": 1.0,
        "steps_per_print": 10**9,
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": WD, "torch_adam": True}},
        "zero_optimization": zero,
        "comms_logger": {"enabled": True, "prof_all": True, "verbose": False},
    }


def full(p: torch.nn.Parameter, stage: int) -> torch.Tensor:
    if stage == 3:
        with deepspeed.zero.GatheredParameters([p]):
            return p.data.detach().clone()
    return p.data.detach().clone()


def adam_fragments(ctl: FreezeController, p) -> dict:
    out = {}
    for key, start, numel in ctl._locate(p):
        flat = ctl._flat(key)
        for name, t in ctl._state_tensors(ctl.inner, flat).items():
            out[(key, start, name)] = t.view(-1)[start:start + numel].clone()
    return out


def train_step(engine, stage: int, step: int, rank: int, frozen_params=()) -> tuple[float, dict, bool]:
    """One optimizer step (ACCUM micro-batches); returns (loss, comm bytes per op, frozen grads were None)."""
    before = comm_bytes_snapshot()
    grads_none = True
    loss_sum = 0.0
    for micro in range(ACCUM):
        g = torch.Generator().manual_seed(1000 * stage + 10 * step + 2 * micro + rank)
        x, y = torch.randn(MICRO, D, generator=g), torch.randn(MICRO, 3, generator=g)
        loss = engine(x, y)
        engine.backward(loss)
        grads_none &= all(p.grad is None for p in frozen_params)
        engine.step()
        loss_sum += float(loss)
    after = comm_bytes_snapshot()
    delta = {k: after[k] - before.get(k, 0) for k in after if after[k] - before.get(k, 0)}
    return loss_sum / ACCUM, delta, grads_none


def build(stage: int, guard: bool):
    torch.manual_seed(0)
    model = Toy()
    engine, _, _, _ = mat_ds.initialize(model=model, model_parameters=model.param_groups(), config=ds_config(stage))
    assert not hasattr(engine, "mat")  # no "mat" block: a plain DeepSpeed engine
    return model, engine, FreezeController(engine, model.head_modules(), guard=guard)


def max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def ranks_identical(values: list[torch.Tensor]) -> bool:
    flat = torch.cat([v.flatten() for v in values])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return all(torch.equal(gathered[0], g) for g in gathered[1:])


def run_stage(stage: int, rank: int, ckpt_dir: str) -> dict:
    res: dict = {"stage": stage}
    mask = torch.zeros(N_HEADS, dtype=torch.bool)
    mask[FROZEN] = True

    # ---- guarded run -------------------------------------------------------------------------------------------
    model, engine, ctl = build(stage, guard=True)
    assert engine.zero_optimization_stage() == stage
    heads = model.head_modules()
    frozen_ps = [p for i in FROZEN for p in heads[i]]
    other_ps = [p for p in model.parameters() if all(p is not q for q in frozen_ps)]
    losses, comm_full, comm_frozen, comm_after = [], [], [], []
    for step in range(2):
        loss, delta, _ = train_step(engine, stage, step, rank)
        losses.append(loss)
        comm_full.append(delta)
    ctl.apply(mask)
    res["frozen_numel"] = ctl.frozen_numel()
    res["frozen_numel_expected"] = sum(int(getattr(p, "ds_numel", p.numel())) for p in frozen_ps)
    world = dist.get_world_size()
    # ZeRO-3 reduce-scatters each parameter padded to a multiple of the world size
    res["frozen_padded_numel"] = sum(p.ds_tensor.numel() * world for p in frozen_ps) if stage == 3 \
        else res["frozen_numel"]
    res["world"], res["accum"] = world, ACCUM
    try:
        ctl.apply(torch.zeros(N_HEADS + 1, dtype=torch.bool))
        res["bad_shape_rejected"] = False
    except ValueError:
        res["bad_shape_rejected"] = True
    res["requires_grad_frozen"] = [bool(p.requires_grad) for p in frozen_ps]
    w_frozen = [full(p, stage) for p in frozen_ps]
    w_other = [full(p, stage) for p in other_ps]
    st_frozen = {}
    for p in frozen_ps:
        st_frozen.update(adam_fragments(ctl, p))
    res["adam_fragments_checked"] = len(st_frozen)
    grads_none = True
    for step in range(2, 5):
        loss, delta, none = train_step(engine, stage, step, rank, frozen_ps)
        losses.append(loss)
        comm_frozen.append(delta)
        grads_none &= none
    res["frozen_grads_none_at_step"] = grads_none
    w_frozen_after = [full(p, stage) for p in frozen_ps]
    res["frozen_bit_identical"] = all(torch.equal(a, b) for a, b in zip(w_frozen, w_frozen_after))
    res["frozen_max_abs_dw_guard"] = max_abs_diff(w_frozen, w_frozen_after)
    st_after = {}
    for p in frozen_ps:
        st_after.update(adam_fragments(ctl, p))
    res["adam_fragments_unchanged"] = st_after.keys() == st_frozen.keys() and all(
        torch.equal(st_frozen[k], st_after[k]) for k in st_frozen)
    res["others_all_changed"] = all(not torch.equal(a, full(p, stage)) for a, p in zip(w_other, other_ps))
    res["others_min_max_abs_dw"] = min(float((a - full(p, stage)).abs().max()) for a, p in zip(w_other, other_ps))

    # unfreeze: the heads train again, their gradients are reduced again (ranks stay identical)
    ctl.apply(torch.zeros(N_HEADS, dtype=torch.bool))
    res["frozen_numel_after_unfreeze"] = ctl.frozen_numel()
    loss, delta, _ = train_step(engine, stage, 5, rank)
    losses.append(loss)
    comm_after.append(delta)
    w_reactivated = [full(p, stage) for p in frozen_ps]
    res["reactivated_all_changed"] = all(not torch.equal(a, b) for a, b in zip(w_frozen_after, w_reactivated))
    res["reactivated_min_max_abs_dw"] = min(float((a - b).abs().max()) for a, b in zip(w_frozen_after, w_reactivated))
    res["ranks_identical"] = ranks_identical([full(p, stage) for p in model.parameters()])
    res["losses"] = losses
    res["loss_finite"] = all(torch.isfinite(torch.tensor(losses)).tolist())
    res["comm_full"], res["comm_frozen"], res["comm_after_unfreeze"] = comm_full, comm_frozen, comm_after
    grad = lambda d: sum(v for k, v in d.items() if k in GRADIENT_OPS)  # noqa: E731
    other = lambda d: {k: v for k, v in d.items() if k not in GRADIENT_OPS}  # noqa: E731
    res["grad_bytes_full"] = [grad(d) for d in comm_full]
    res["grad_bytes_frozen"] = [grad(d) for d in comm_frozen]
    res["grad_bytes_after_unfreeze"] = [grad(d) for d in comm_after]
    # the first step also carries one-off traffic (ZeRO-3 broadcasts/gathers at the first forward): compare step 2 on
    res["non_grad_ops_unchanged"] = all(other(d) == other(comm_full[1]) for d in comm_frozen + comm_after)
    ctl.close()
    res["n_params"] = sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters())
    del engine, ctl

    # ---- unguarded run: requires_grad toggling only ---------------------------------------------------------------
    model, engine, ctl = build(stage, guard=False)
    heads = model.head_modules()
    frozen_ps = [p for i in FROZEN for p in heads[i]]
    for step in range(2):
        train_step(engine, stage, step, rank)
    ctl.apply(mask)
    w0 = [full(p, stage) for p in frozen_ps]
    for step in range(2, 5):
        train_step(engine, stage, step, rank, frozen_ps)
    res["frozen_max_abs_dw_noguard"] = max_abs_diff(w0, [full(p, stage) for p in frozen_ps])
    del engine, ctl

    # ---- frozen from the very first step (no optimizer state yet), across a checkpoint save/load ------------------
    model, engine, ctl = build(stage, guard=True)
    heads = model.head_modules()
    frozen_ps = [p for i in FROZEN for p in heads[i]]
    ctl.apply(mask)
    w0 = [full(p, stage) for p in frozen_ps]
    train_step(engine, stage, 0, rank, frozen_ps)
    lazy = {}
    for p in frozen_ps:
        lazy.update(adam_fragments(ctl, p))
    res["lazy_state_fragments"] = len(lazy)
    res["lazy_state_zero"] = all(bool((t == 0).all()) for t in lazy.values())
    engine.save_checkpoint(ckpt_dir, tag=f"zero{stage}")
    train_step(engine, stage, 1, rank, frozen_ps)
    engine.load_checkpoint(ckpt_dir, tag=f"zero{stage}")
    ctl.apply(mask)  # what the trainer does after loading a checkpoint
    for step in range(2, 4):
        loss, _, _ = train_step(engine, stage, step, rank, frozen_ps)
    after = {}
    for p in frozen_ps:
        after.update(adam_fragments(ctl, p))
    res["resumed_frozen_bit_identical"] = all(torch.equal(a, full(p, stage)) for a, p in zip(w0, frozen_ps))
    res["resumed_state_zero"] = after.keys() == lazy.keys() and all(bool((t == 0).all()) for t in after.values())
    res["resumed_loss_finite"] = math.isfinite(loss)
    ctl.close()
    del engine, ctl
    return res


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--stages", default="0,1,2,3")
    parser.add_argument("--ckpt_dir", default=None, help="Scratch directory for checkpoints (default: a temp dir).")
    parser.add_argument("--local_rank", type=int, default=-1)
    args = parser.parse_args()
    init_distributed()
    rank = dist.get_rank()
    holder = [args.ckpt_dir or (tempfile.mkdtemp(prefix="freeze_check_") if rank == 0 else None)]
    dist.broadcast_object_list(holder, src=0)
    for stage in [int(s) for s in args.stages.split(",")]:
        res = run_stage(stage, rank, holder[0])
        if rank == 0:
            print("FREEZE_CHECK " + json.dumps(res), flush=True)
        dist.barrier()
    shutdown_distributed()


if __name__ == "__main__":
    main()
    exit_process(0)  # no interpreter teardown after the work is done: see mat_ds.distributed.exit_process
