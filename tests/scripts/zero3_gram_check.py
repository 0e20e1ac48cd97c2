"""Multi-rank check of the ZeRO-3 "shard-split" mNTK Gram against ZeRO-0 and an explicit Jacobian.

    deepspeed --num_gpus 2 tests/scripts/zero3_gram_check.py

One tiny BERT-style ``Transformer`` (same seed, same weights on every rank) is built three times: a plain float64 copy
for ``tests/oracles.py::explicit_head_grams`` (rank 0 only), a ZeRO-0 engine probed with ``split="layer"`` and a ZeRO-3
engine (every parameter really partitioned) probed with ``split="shard"``. Engines come from ``mat_ds.initialize``
without a ``"mat"`` block (plain DeepSpeed); the probe is ``mat_ds.core.mntk.probe_units`` on the model's units
(``find_units``) with the own model's per-sample loss (``mat_ds.adapters.own.probe_fn``), as the engine's refresh calls
it. Each engine first takes one real optimizer step with lr = 0, so the probe runs in the state the trainer probes in
(after a step) while the weights stay the same; one more step after the probe must give ZeRO-0's loss exactly (same
weights, same dropout masks).

Shapes: n_head=3, d_model=15 -> per head a QKV parameter of 15x15 = 225 and a projection parameter of 15x5 = 75
elements, neither divisible by 2, so on 2 ranks every head parameter has a padded last ZeRO-3 chunk and chunk borders
that cut through parameter rows (asserted below).

Also checked: the chunk layout ``mat_ds.core.mntk.zero3_owned_range`` assumes, against
``deepspeed.zero.GatheredParameters`` (the local ``ds_tensor`` is the owned slice of the flattened full parameter, and
the ranks' ranges tile [0, numel) exactly). Rank 0 prints one line ``ZERO3_GRAM {json}``.
"""
from __future__ import annotations

import argparse
import copy
import json

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

import mat_ds
from mat_ds.adapters.own import probe_fn as own_probe_fn
from mat_ds.config import ModelConfig
from mat_ds.core.config import MATConfig
from mat_ds.core.freezing import comm_bytes_snapshot
from mat_ds.core.mntk import lambda_max, probe_units, resolve_split, zero3_owned_range
from mat_ds.core.units import find_units
from mat_ds.distributed import exit_process, init_distributed, shutdown_distributed
from mat_ds.models.transformer import Transformer
from tests.oracles import explicit_head_grams

CFG = dict(arch="bert", n_layer=2, n_head=3, d_model=15, d_ff=30, dropout=0.1)
VOCAB, SEQ, MICRO = 64, 16, 4
PROBE_FN = own_probe_fn(MATConfig(probe_output="loss"))


def ds_config(stage: int) -> dict:
    zero = {"stage": stage}
    if stage == 3:  # partition every parameter (the default threshold would keep this tiny model whole)
        zero.update({"stage3_param_persistence_threshold": 0})
    return {
        "train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
        "optimizer": {"type": "AdamW", "params": {"lr": 0.0, "weight_decay": 0.01, "torch_adam": True}},
        "zero_optimization": zero,
        "comms_logger": {"enabled": True, "prof_all": True, "verbose": False},
    }


def mlm_batch(n: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    labels = torch.full_like(ids, -100)
    sel = torch.rand(ids.shape, generator=g) < 0.3
    sel[:, 0] = True  # every sample has a target
    labels[sel] = ids[sel]
    return {"input_ids": ids, "labels": labels}


def base_model() -> Transformer:
    torch.manual_seed(0)
    m = Transformer(ModelConfig(**CFG), VOCAB, SEQ)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # away from init, so heads differ like in a trained model
        for p in m.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return m


def train_step(engine, seed: int) -> tuple[float, dict]:
    """One optimizer step; returns the loss and this rank's DeepSpeed comm bytes per op during the step."""
    b = mlm_batch(MICRO, seed + dist.get_rank())
    before = comm_bytes_snapshot()
    torch.manual_seed(seed)  # same dropout masks under ZeRO-0 and ZeRO-3
    loss = engine(b["input_ids"], b["labels"])
    engine.backward(loss)
    engine.step()
    after = comm_bytes_snapshot()
    return float(loss.detach()), {k: after[k] - before.get(k, 0) for k in after if after[k] - before.get(k, 0)}


def gathered_leftovers(model) -> int:
    """Elements of ZeRO-3 parameters that are currently gathered (full) on this rank."""
    return sum(int(p.ds_numel) for p in model.parameters() if p.ds_status != ZeroParamStatus.NOT_AVAILABLE)


def full(p, stage: int) -> torch.Tensor:
    if stage == 3:
        with deepspeed.zero.GatheredParameters([p]):
            return p.data.detach().clone()
    return p.data.detach().clone()


def check_layout(model: Transformer, base: Transformer) -> dict:
    """ZeRO-3 chunks vs the gathered parameters; returns the facts for the JSON line."""
    world = dist.get_world_size()
    ok_slices, ok_cover, ok_weights, odd = True, True, True, []
    base_params = dict(base.named_parameters())
    for name, p in model.named_parameters():
        flat = full(p, 3).view(-1)
        ok_weights &= torch.equal(flat, base_params[name].detach().view(-1))
        if ".attn." not in name:
            continue
        lo, hi, part_world = zero3_owned_range(p)
        ok_slices &= part_world == world and torch.equal(p.ds_tensor.view(-1)[:hi - lo], flat[lo:hi])
        ranges = [None] * world
        dist.all_gather_object(ranges, (lo, hi))
        ok_cover &= ranges[0][0] == 0 and ranges[-1][1] == flat.numel() and all(
            a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        if flat.numel() % world:
            odd.append(name)
    return {"layout_slices_match": bool(ok_slices), "layout_ranges_tile": bool(ok_cover),
            "zero3_weights_equal_base": bool(ok_weights), "head_params_not_divisible_by_world": len(odd)}


def rel_max(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() / b.abs()).max())


def rel_norm(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n_probe", type=int, default=6)
    parser.add_argument("--local_rank", type=int, default=-1)
    args = parser.parse_args()
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    base = base_model()
    probe = mlm_batch(args.n_probe, seed=123)
    res: dict = {"world": world, "n_probe": args.n_probe, "n_layer": CFG["n_layer"], "n_head": CFG["n_head"]}

    if rank == 0:
        ref_model = copy.deepcopy(base).double()
        ref = explicit_head_grams(ref_model, find_units(ref_model), probe, PROBE_FN)

    # ---- ZeRO-0, split="layer" -----------------------------------------------------------------------------------
    m0 = copy.deepcopy(base)
    e0, _, _, _ = mat_ds.initialize(model=m0, model_parameters=m0.param_groups(0.01), config=ds_config(0))
    assert not hasattr(e0, "mat")  # no "mat" block: a plain DeepSpeed engine
    train_step(e0, 10)
    u0 = find_units(e0.module)
    res["zero0_auto_split"] = resolve_split(u0)
    p0 = probe_units(e0.module, u0, probe, PROBE_FN, split="layer")
    res["zero0_after_probe_loss"] = train_step(e0, 20)[0]
    res["zero0_probe_comm_bytes"] = p0.probe_comm_bytes
    res["zero0_gram_allreduce_bytes"] = p0.gram_allreduce_bytes

    # ---- ZeRO-3, split="shard" (chosen by "auto") ----------------------------------------------------------------
    m3 = copy.deepcopy(base)
    e3, _, _, _ = mat_ds.initialize(model=m3, model_parameters=m3.param_groups(0.01), config=ds_config(3))
    assert e3.zero_optimization_stage() == 3
    train_step(e3, 10)
    res.update(check_layout(e3.module, base))
    u3 = find_units(e3.module)
    res["zero3_auto_split"] = resolve_split(u3)
    p3 = probe_units(e3.module, u3, probe, PROBE_FN)  # auto -> shard
    # The probe's autograd.grad stops at the recorded layer outputs, so ZeRO-3's post-backward release never fires for
    # the modules below them (embeddings, block 0's LayerNorm and QKV) and for the root's tied decoder weight: those
    # stay gathered until the next step, unless the caller releases them (what the trainer should do).
    res["zero3_gathered_numel_after_probe"] = gathered_leftovers(e3.module)
    e3.empty_partition_cache()
    res["zero3_gathered_numel_after_release"] = gathered_leftovers(e3.module)
    # the other split on the same engine, for comparison
    p3_layer = probe_units(e3.module, u3, probe, PROBE_FN, split="layer")
    # ... and this time no release: the next step must still be right (it re-uses, then releases, the leftovers).
    res["zero3_after_probe_loss"], res["zero3_step_comm_bytes"] = train_step(e3, 20)
    res["zero3_gathered_numel_after_step"] = gathered_leftovers(e3.module)
    res["zero3_split"] = p3.split
    res["zero3_gram_allreduce_bytes"] = p3.gram_allreduce_bytes
    res["expected_gram_bytes"] = CFG["n_layer"] * CFG["n_head"] * args.n_probe ** 2 * 4
    res["zero3_probe_comm_bytes"] = p3.probe_comm_bytes  # rank 0's DeepSpeed traffic of the probe's fwd/bwd
    res["zero3_probe_comm_bytes_total"] = sum((p3.probe_comm_bytes or {}).values())
    res["zero3_params_bytes_fp32"] = sum(int(p.ds_numel) for p in e3.module.parameters()) * 4
    work = [None] * world
    dist.all_gather_object(work, (p3.grad_numel, p3.grad_numel_unsplit))
    res["shard_grad_numel_per_rank"] = [w[0] for w in work]
    res["shard_grad_numel_unsplit"] = work[0][1]
    grams = [torch.empty_like(p3.head_grams) for _ in range(world)]
    dist.all_gather(grams, p3.head_grams)
    res["shard_grams_identical_on_ranks"] = all(torch.equal(grams[0], g) for g in grams[1:])

    if rank == 0:
        lam0, lam3, lam_ref = p0.head_lambda_max(), p3.head_lambda_max(), lambda_max(ref)
        res["rel_lambda_zero3_vs_zero0"] = rel_max(lam3, lam0)
        res["rel_lambda_zero3_vs_explicit"] = rel_max(lam3, lam_ref)
        res["rel_lambda_zero0_vs_explicit"] = rel_max(lam0, lam_ref)
        res["rel_lambda_zero3_layer_vs_shard"] = rel_max(p3_layer.head_lambda_max(), lam3)
        res["rel_gram_zero3_vs_zero0"] = rel_norm(p3.head_grams, p0.head_grams)
        res["rel_gram_zero3_vs_explicit"] = rel_norm(p3.head_grams, ref)
        res["lambda_max_zero3"] = lam3.tolist()
        res["lambda_spread"] = float(lam3.std() / lam3.mean())
        print("ZERO3_GRAM " + json.dumps(res), flush=True)
    shutdown_distributed()


if __name__ == "__main__":
    main()
    exit_process(0)  # no interpreter teardown after the work is done: see mat_ds.distributed.exit_process
