"""Multi-rank checks of MAT on Switch MoE experts (``mat_ds/models/switch.py`` on ``deepspeed.moe``, the generic expert
code in ``mat_ds/core/experts.py``) on real DeepSpeed engines.

    deepspeed --num_gpus 2 tests/scripts/moe_check.py --configs 0:1,2:1,2:2

For every ``stage:ep_size`` pair (ZeRO stage, expert-parallel size) one tiny Switch BERT (every block an MoE layer,
4 experts each) is built on 2 ranks (``mat_ds.initialize`` without a ``"mat"`` block: a plain DeepSpeed engine; the
script drives the probe and ``FreezeController`` itself) and checked:

* the expert-parallel rank the model assumed when it initialised its experts is the one DeepSpeed's groups give;
* per-expert mNTK: ``mat_ds.core.mntk.probe_units(..., experts=True).expert_grams`` (activation-based, routing
  recovered from the gates) against ``tests/oracles.py::explicit_expert_grams`` (n backward passes of parameter
  gradients), before and after training steps;
* freezing experts {0, 3} of layer 0 and {1} of layer 1 (global ids: with ep_size 2 they live on both ranks):
  frozen weights and their Adam-state fragments bit-identical over 3 steps, their ``.grad`` None after backward
  (no weight-gradient compute), everything else moving, and the gradient bytes each rank sends per step
  (DeepSpeed comms logger) before vs while frozen, next to the frozen experts' size on that rank;
* the ranks' frozen masks are identical (all-gathered) and expert-data-parallel copies of an expert hold identical
  weights at the end (ep_size 1: both ranks hold every expert);
* ZeRO-3 with native MoE is refused by ``mat_ds.initialize`` (config with a ``"mat"`` block) with a one-line
  ConfigError.

Rank 0 prints one line ``MOE_CHECK {json}`` per pair.
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist

import mat_ds
from mat_ds.adapters.own import probe_fn as own_probe_fn
from mat_ds.config import ConfigError, ModelConfig
from mat_ds.core.config import MATConfig
from mat_ds.core.experts import find_moe_layers
from mat_ds.core.freezing import GRADIENT_OPS, FreezeController, comm_bytes_snapshot
from mat_ds.core.mntk import lambda_max, probe_units
from mat_ds.core.units import find_units
from mat_ds.distributed import exit_process, init_distributed, shutdown_distributed
from mat_ds.models.switch import switch_layers
from mat_ds.models.transformer import Transformer
from tests.oracles import explicit_expert_grams

VOCAB, T, N_PROBE, MICRO, ACCUM = 64, 8, 6, 4, 2
FROZEN = [0, 3, 5]  # global expert ids: layer 0 experts 0 and 3, layer 1 expert 1
E = 4
PROBE_FN = own_probe_fn(MATConfig(probe_output="loss"))


def ds_config(stage: int) -> dict:
    return {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": ACCUM, "gradient_clipping": 1.0,
            "steps_per_print": 10**9,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.1, "torch_adam": True}},
            "zero_optimization": {"stage": stage},
            "comms_logger": {"enabled": True, "prof_all": True, "verbose": False}}


def model_config(ep: int) -> ModelConfig:
    return ModelConfig(arch="bert", n_layer=2, n_head=2, d_model=16, d_ff=24, dropout=0.0, moe_num_experts=E,
                       moe_layer_interval=1, moe_ep_size=ep, moe_capacity_factor=1.0, moe_min_capacity=2)


def batch(seed: int, n: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, T), generator=g)
    labels = torch.where(torch.rand(n, T, generator=g) < 0.4, ids, torch.full_like(ids, -100))
    labels[:, 0] = ids[:, 0]  # every sample has a target
    return {"input_ids": ids, "labels": labels}


def build_engine(model: Transformer, cfg: dict):
    """What the old ``build_engine`` did: DeepSpeed (through ``mat_ds.initialize``) with the model's param groups."""
    weight_decay = float(cfg["optimizer"]["params"].get("weight_decay", 0.0))
    engine, _, _, _ = mat_ds.initialize(model=model, model_parameters=model.param_groups(weight_decay), config=cfg)
    return engine


def expert_grams(model, units, probe) -> tuple[torch.Tensor, torch.Tensor]:
    """(fast Grams from one probe pass, explicit-Jacobian ground truth), both [moe_layers·E, n, n]."""
    fast = probe_units(model, units, probe, PROBE_FN, experts=True).expert_grams
    return fast, explicit_expert_grams(model, units, probe, PROBE_FN)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def adam_fragments(ctl: FreezeController, params) -> dict:
    out = {}
    for p in params:
        for key, start, numel in ctl._locate(p):
            for name, t in ctl._state_tensors(ctl.inner, ctl._flat(key)).items():
                out[(key, start, name)] = t.view(-1)[start:start + numel].clone()
    return out


def train_step(engine, step: int, rank: int, frozen=()) -> tuple[float, int, bool]:
    before = comm_bytes_snapshot()
    none, loss_sum = True, 0.0
    for micro in range(ACCUM):
        b = batch(10_000 + 100 * step + 10 * micro + rank, MICRO)
        loss = engine(b["input_ids"], b["labels"])
        engine.backward(loss)
        none &= all(p.grad is None for p in frozen)
        engine.step()
        loss_sum += float(loss)
    after = comm_bytes_snapshot()
    grad_bytes = sum(after[k] - before.get(k, 0) for k in after if k in GRADIENT_OPS)
    return loss_sum / ACCUM, grad_bytes, none


def gather_bool(x: bool) -> list[bool]:
    t = torch.tensor([int(x)])
    out = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [bool(v) for v in out]


def run(stage: int, ep: int, rank: int) -> dict:
    res: dict = {"stage": stage, "ep_size": ep, "world": dist.get_world_size(), "accum": ACCUM}
    torch.manual_seed(0)
    model = Transformer(model_config(ep), VOCAB, T)
    engine = build_engine(model, ds_config(stage))
    assert not hasattr(engine, "mat")  # no "mat" block: a plain DeepSpeed engine
    # The model seeded each expert by (layer, GLOBAL expert id) with an ep_rank it computed before DeepSpeed created
    # the expert groups; the groups must agree, or expert e would not start with the same weights for every ep_size.
    res["ep_rank_matches_deepspeed"] = all(gather_bool(all(
        sw.ep_rank == layer.ep_rank for sw, layer in zip(switch_layers(model), find_moe_layers(model)))))
    units = find_units(model)  # after initialize: expert-parallel ranks come from DeepSpeed's groups
    probe = batch(7, N_PROBE)  # the same probe batch on every rank, as the trainer's

    G, X = expert_grams(model, units, probe)
    res["gram_rel_err_init"] = rel(G, X)
    res["lambda_rel_err_init"] = rel(lambda_max(G), lambda_max(X))
    res["lambda_init"] = lambda_max(G).flatten().tolist()

    experts = [u.params for u in units.experts]  # global expert order; [] where another rank holds the expert
    ctl = FreezeController(engine, experts)
    mask = torch.zeros(len(experts), dtype=torch.bool)
    mask[FROZEN] = True
    frozen_ps = [p for i in FROZEN for p in experts[i]]  # this rank's share of the frozen experts
    other_ps = [p for p in model.parameters() if all(p is not q for q in frozen_ps)]
    res["local_frozen_numel"] = sum(p.numel() for p in frozen_ps)

    losses, bytes_full, bytes_frozen = [], [], []
    for step in range(2):
        loss, nbytes, _ = train_step(engine, step, rank)
        losses.append(loss)
        bytes_full.append(nbytes)
    ctl.apply(mask)
    res["masks_identical"] = all(gather_bool(bool(torch.equal(ctl.frozen, mask))))
    w0 = [p.detach().clone() for p in frozen_ps]
    o0 = [p.detach().clone() for p in other_ps]
    s0 = adam_fragments(ctl, frozen_ps)
    grads_none = True
    for step in range(2, 5):
        loss, nbytes, none = train_step(engine, step, rank, frozen_ps)
        losses.append(loss)
        bytes_frozen.append(nbytes)
        grads_none &= none
    s1 = adam_fragments(ctl, frozen_ps)
    res["frozen_bit_identical"] = all(gather_bool(all(torch.equal(a, p) for a, p in zip(w0, frozen_ps))))
    res["frozen_max_abs_dw"] = max([float((a - p).abs().max()) for a, p in zip(w0, frozen_ps)] or [0.0])
    res["adam_fragments"] = len(s0)
    res["adam_unchanged"] = all(gather_bool(s0.keys() == s1.keys() and all(torch.equal(s0[k], s1[k]) for k in s0)))
    res["frozen_grads_none"] = all(gather_bool(grads_none))
    res["others_changed"] = all(gather_bool(all(not torch.equal(a, p) for a, p in zip(o0, other_ps))))
    res["losses"] = losses

    # per-rank gradient bytes per step: all-gather (full, frozen, local frozen numel)
    mine = torch.tensor([bytes_full[-1], bytes_frozen[-1], res["local_frozen_numel"]], dtype=torch.long)
    every = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    res["grad_bytes_per_rank"] = [{"full": int(v[0]), "frozen": int(v[1]), "drop": int(v[0] - v[1]),
                                   "frozen_expert_bytes": 4 * int(v[2])} for v in every]
    res["grad_bytes_steady"] = len(set(bytes_frozen)) == 1 and len(set(bytes_full[1:])) == 1

    # expert-data-parallel copies agree (ep_size 1: every rank holds every expert)
    flat = torch.cat([p.detach().flatten() for params in experts for p in params])
    copies = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(copies, flat)
    res["expert_copies_identical"] = all(torch.equal(copies[0], c) for c in copies[1:]) if ep == 1 else None

    G, X = expert_grams(model, units, probe)
    res["gram_rel_err_trained"] = rel(G, X)
    res["lambda_rel_err_trained"] = rel(lambda_max(G), lambda_max(X))
    ctl.close()
    return res


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", default="0:1,2:1,2:2", help="stage:ep_size pairs")
    parser.add_argument("--local_rank", type=int, default=-1)
    args = parser.parse_args()
    init_distributed()
    rank = dist.get_rank()
    for pair in args.configs.split(","):
        stage, ep = (int(v) for v in pair.split(":"))
        res = run(stage, ep, rank)
        if rank == 0:
            print("MOE_CHECK " + json.dumps(res), flush=True)
        dist.barrier()
    try:  # with a "mat" block, mat_ds.initialize says it up front (plain DeepSpeed would assert deep inside)
        build_engine(Transformer(model_config(1), VOCAB, T), {**ds_config(3), "mat": {"policy": "mat"}})
        refused = None
    except ConfigError as exc:
        refused = str(exc)
    if rank == 0:
        print("MOE_CHECK " + json.dumps({"zero3_refused": refused}), flush=True)
    shutdown_distributed()


if __name__ == "__main__":
    main()
    exit_process(0)  # no interpreter teardown after the work is done: see mat_ds.distributed.exit_process
