"""MAT under DeepSpeed AutoTP training (``"tensor_parallel": {"autotp_size": 2}``) against the same run without TP.

    deepspeed --num_gpus 2 tests/scripts/tp_check.py --cases 1,2     # TP 2 x DP 1, ZeRO-1 and ZeRO-2
    deepspeed --num_gpus 4 tests/scripts/tp_check.py --cases 1,2     # TP 2 x DP 2

A case is ``[family:]stage[+mlp][+bf16]``: a ZeRO stage, ``+mlp`` for MLP units too (``"modules": ["heads",
"mlp"]``), ``+bf16`` for bf16; family ``llama`` (default: HF LlamaForCausalLM, 4 heads / 2 KV heads = 2 MAT units
per layer), ``bert`` (BertForMaskedLM, 4 heads = 4 units per layer), ``neox`` (GPTNeoXForCausalLM, fused
per-head-interleaved query_key_value, 4 units) or ``phi3`` (Phi3ForCausalLM, fused blocked qkv_proj, 4 heads / 2 KV
heads = 2 units; DeepSpeed's ``preset_model`` "phi3") or ``own`` (a user's Megatron-style model registered with
``register_family``: tests/scripts/megatron_style.py, 2 query groups per layer); d 32, 2 layers, fp32, seeded alike
on every rank. ``resume:stage`` is the checkpoint
case (``resume``: save under TP, load into a fresh TP engine, the continuation bit-identical). Per other case TWO
engines on the same ranks, through ``mat_ds.initialize`` with one JSON that differs only in ``tensor_parallel``: the
reference (TP 1, DP = world) first, for every case, then the TP engine (TP 2, DP = world / 2) — the reference must
exist before any TP group does, since DeepSpeed's groups are process-wide. Both see the same global batch per
micro-step (G rows, split over their DP replicas) and capture the same probe set from it (each replica's micro-batch,
gathered over the DP group). Each engine:

1. 7 steps with MAT's policy refreshing every 3 (steps 0, 3, 6): per step the global loss, DeepSpeed's global grad
   norm (clipping at 0.3 acts at every step), the frozen set on every rank; on refresh steps λmax of every unit;
   between refreshes ``engine.mat.frozen_change`` (weights of frozen units) and the frozen params' fp32 master /
   exp_avg / exp_avg_sq fragments read straight from the ZeRO optimizer (``family_check.opt_fragments``): both must
   not move;
2. refreshes off; one step with everything unfrozen, then the same batch with a fixed set frozen (unit 0 of layer 0:
   TP rank 0's; unit 1 of layer 1: TP rank 1's), then one more frozen step: gradient bytes per step (comms logger,
   ``GRADIENT_OPS``) unfrozen minus frozen against 4·N (ZeRO-1) or A·4·N (ZeRO-2), N the frozen numel THIS rank
   holds; TP activation all-reduces (AutoTP's and mat_ds's) are the same in both steps, so the difference is DP
   gradient traffic alone.

``--elastic save|resume`` (``elastic``; tests/test_universal.py): a checkpoint saved at one (TP, DP) with
``mat_ds.checkpoint.save`` and resumed at another through DeepSpeed's universal checkpoint, in two launches.

Also: attention (unit) parameters per rank against the whole model's, the module types (mat_ds's TPHeadwiseLinear
for attention, AutoTP's LinearLayer / LinearAllreduce for the MLP), the probe set equal on all ranks and to the
reference's, and replicated parameters (embedding, norms) equal over the TP group after training. Rank 0 prints one
``TP_CHECK {json}`` line per case with the TP run's figures and their differences from the reference.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist

from deepspeed.runtime.utils import clip_grad_norm_

import mat_ds
from mat_ds.core.freezing import GRADIENT_OPS, comm_bytes_snapshot
from mat_ds.distributed import exit_process
from tests.scripts import megatron_style
from tests.scripts.family_check import local, opt_fragments
from tests.states import same

V, T, D, L, H, KV = 100, 16, 32, 2, 4, 2
G, ACCUM, N_PROBE = 8, 2, 6  # global rows per micro-step, micro-steps per optimizer step, probe samples
LR, WD = 5e-3, 0.01
CLIP = 0.3  # below every step's global grad norm (~0.5): clipping acts at every step, so a wrong norm moves the loss
POLICY_STEPS, INTERVAL = 7, 3
MLP_GROUPS = 2


def build_model(family: str) -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    if family == "own":
        return megatron_style.MegatronStyleLM(V, D, L, H, KV, 64, T)
    if family == "bert":
        return transformers.BertForMaskedLM(transformers.BertConfig(
            vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=H, intermediate_size=64,
            max_position_embeddings=T, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    if family == "neox":
        return transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
            vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=H, intermediate_size=64,
            max_position_embeddings=T, attention_dropout=0.0, hidden_dropout=0.0, use_cache=False))
    if family == "phi3":
        return transformers.Phi3ForCausalLM(transformers.Phi3Config(
            vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=H, num_key_value_heads=KV,
            intermediate_size=64, max_position_embeddings=T, attention_dropout=0.0, resid_pdrop=0.0,
            embd_pdrop=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2, use_cache=False))
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=H, num_key_value_heads=KV,
        intermediate_size=64, max_position_embeddings=T, attention_dropout=0.0, use_cache=False))


def modules_of(family: str, model: torch.nn.Module) -> dict:
    """The projections whose types the check reports (layer 0) and the LM head."""
    if family == "bert":
        layer = model.bert.encoder.layer[0]
        return {"q_proj": layer.attention.self.query, "o_proj": layer.attention.output.dense,
                "up_proj": layer.intermediate.dense, "down_proj": layer.output.dense,
                "lm_head": model.cls.predictions.decoder}
    if family == "neox":
        layer = model.gpt_neox.layers[0]
        return {"q_proj": layer.attention.query_key_value, "o_proj": layer.attention.dense,
                "up_proj": layer.mlp.dense_h_to_4h, "down_proj": layer.mlp.dense_4h_to_h,
                "lm_head": model.get_output_embeddings()}
    if family == "own":
        layer = model.layers[0]
        return {"q_proj": layer["linear_qkv"], "o_proj": layer["linear_proj"], "up_proj": layer["linear_fc1"],
                "down_proj": layer["linear_fc2"], "lm_head": model.lm_head}
    if family == "phi3":
        layer = model.model.layers[0]
        return {"q_proj": layer.self_attn.qkv_proj, "o_proj": layer.self_attn.o_proj,
                "up_proj": layer.mlp.gate_up_proj, "down_proj": layer.mlp.down_proj, "lm_head": model.lm_head}
    layer = model.model.layers[0]
    return {"q_proj": layer.self_attn.q_proj, "o_proj": layer.self_attn.o_proj, "up_proj": layer.mlp.up_proj,
            "down_proj": layer.mlp.down_proj, "lm_head": model.lm_head}


def ds_config(stage: int, tp: int, mlp: bool, micro: int, bf16: bool = False, family: str = "llama") -> dict:
    cfg = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": ACCUM, "gradient_clipping": CLIP,
           "steps_per_print": 10**9,
           "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": WD, "torch_adam": True}},
           "zero_optimization": {"stage": stage},
           "comms_logger": {"enabled": True, "prof_all": True, "verbose": False, "debug": False},
           "mat": {"policy": "mat", "warmup_steps": 0, "refresh_interval": INTERVAL, "probe_samples": N_PROBE,
                   "alpha": 0.3, **({"modules": ["heads", "mlp"], "mlp_groups": MLP_GROUPS} if mlp else {})}}
    if tp > 1:
        cfg["tensor_parallel"] = {"autotp_size": tp}
        if family == "phi3":  # what plain DeepSpeed needs too: it rejects Phi-3's HF tp_plan ("rowwise_split_input")
            cfg["tensor_parallel"]["preset_model"] = "phi3"
        if family == "own":  # no preset, no HF tp_plan: the user says how AutoTP shards the MLP
            cfg["tensor_parallel"]["partition_config"] = megatron_style.PARTITION_CONFIG
    if bf16:  # bf16 weights and gradients (reduced in bf16), fp32 master weights and Adam moments
        cfg["bf16"] = {"enabled": True}
    return cfg


def global_batch(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (G, T), generator=g)
    # Every position a target (also for BERT's masked LM): every row then weighs the same in the loss, so the mean
    # of the DP replicas' mean losses is the global batch's mean for any DP size and the runs optimise one objective.
    return {"input_ids": ids, "labels": ids.clone()}


def gather(obj) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class Run:
    """One engine (TP 1 or TP 2) through the whole schedule; ``record`` holds what it measured."""

    def __init__(self, family: str, stage: int, tp: int, mlp: bool, bf16: bool = False):
        self.family, self.stage, self.tp, self.mlp = family, stage, tp, mlp
        self.world = dist.get_world_size()
        self.dp = self.world // tp
        self.micro = G // self.dp
        model = build_model(family)
        self.engine, *_ = mat_ds.initialize(model=model, model_parameters=model.parameters(),
                                            config=ds_config(stage, tp, mlp, self.micro, bf16, family))
        self.mat = self.engine.mat
        self.topo = self.mat.topology
        assert (self.topo.tp_size, self.topo.dp_size) == (tp, self.dp), self.topo.describe()

    def my_rows(self, batch: dict) -> dict:
        lo = self.topo.dp_rank * self.micro
        return {k: v[lo:lo + self.micro] for k, v in batch.items()}

    def step(self, seed: int) -> tuple[float, int, float]:
        """One optimizer step on global batches seed*10 + m: (global mean loss, gradient bytes on this rank, the
        global gradient norm DeepSpeed clips with)."""
        before = comm_bytes_snapshot()
        total, norm = 0.0, None
        for m in range(ACCUM):
            loss = self.engine(**self.my_rows(global_batch(seed * 10 + m))).loss
            self.engine.backward(loss)
            if self.stage == 0 and m == ACCUM - 1:
                # ZeRO-0 fp32 keeps no norm (get_global_grad_norm() is None): take it from the reduced gradients
                # with the function its clipping calls (runtime.utils.clip_grad_norm_, mpu-aware), not clipping.
                norm = float(clip_grad_norm_(self.engine.module.parameters(), float("inf"), mpu=self.engine.mpu))
            self.engine.step()
            total += float(loss.detach())
        after = comm_bytes_snapshot()
        grad_bytes = sum(after[k] - before.get(k, 0) for k in after if k in GRADIENT_OPS)
        mean = torch.tensor([total / ACCUM], dtype=torch.float64)
        dist.all_reduce(mean, group=self.topo.dp_group)  # TP ranks of a replica hold the same loss
        if norm is None:
            norm = float(self.engine.get_global_grad_norm())
        return float(mean) / self.dp, grad_bytes, norm

    def frozen_state(self) -> tuple[list, dict]:
        params = [p for u in self.mat.frozen_units() for p in u.params]
        return params, opt_fragments(self.engine, self.stage, params)

    def masks(self) -> list:
        return [int(b) for kind in ("heads", "mlp") for b in self.mat.frozen_mask(kind).tolist()]

    def set_frozen(self, heads: list[int], mlp: list[int] = ()) -> list:
        nh, nm = len(self.mat.units.heads), len(self.mat.units.mlp)
        mask = torch.zeros(nh + nm + len(self.mat.units.experts), dtype=torch.bool)
        mask[list(heads)] = True
        mask[[nh + g for g in mlp]] = True
        self.mat.freezer.apply(mask)
        self.mat.policies["heads"].frozen = mask[:nh].clone()
        self.mat.policies["mlp"].frozen = mask[nh:nh + nm].clone()
        return [u for u, f in zip(self.mat.units.all(), mask.tolist()) if f]

    def run(self) -> dict:
        t0 = time.perf_counter()
        rec: dict = {"losses": [], "grad_norms": [], "lambda": {}, "masks": [], "weight_drift": 0.0,
                     "state_drift": 0.0}
        # 1. MAT's policy
        for step in range(POLICY_STEPS):
            snap = self.mat.snapshot_frozen()
            frozen, frags = self.frozen_state()
            loss, _, norm = self.step(step)
            rec["losses"].append(loss)
            rec["grad_norms"].append(norm)
            metrics = self.mat.metrics()
            # Step 0 refreshes as soon as its first forward has captured the probe set (is_refresh_step is False
            # before that), so whether a step refreshed is read afterwards.
            if "mat/refresh_seconds" in metrics:
                rec["lambda"][str(step)] = {k.rpartition("/")[2]: v for k, v in metrics.items()
                                            if "lambda_max/" in k}
            else:
                rec["weight_drift"] = max(rec["weight_drift"], self.mat.frozen_change(snap))
                after = opt_fragments(self.engine, self.stage, frozen)
                rec["state_drift"] = max([rec["state_drift"]] + [float((frags[k] - after[k]).abs().max())
                                                                 for k in frags])
            rec["masks"].append(gather(self.masks()))
            rec["frozen_params"] = metrics["mat/frozen_params"]  # the whole model's, also under TP
        rec["probe_equal_on_ranks"] = all(
            all(torch.equal(b[k], self.mat.probe.batch[k]) for k in b) for b in gather(self.mat.probe.batch))
        rec["probe_batch"] = self.mat.probe.batch
        # 2. gradient bytes: everything trains, then a fixed set frozen, on the same batch
        self.mat.cfg.refresh_interval = 10**6
        self.set_frozen([])
        loss, full_bytes, _ = self.step(100)
        rec["losses"].append(loss)
        hpl = self.mat.units.heads_per_layer
        frozen_units = self.set_frozen([0, 2 * hpl - 1], [1] if self.mlp else [])
        frozen = [p for u in frozen_units for p in u.params]  # what THIS rank holds of them
        w0 = [local(p).detach().clone() for p in frozen]
        s0 = opt_fragments(self.engine, self.stage, frozen)
        frozen_bytes = []
        for _ in range(2):
            loss, nbytes, _ = self.step(100)
            rec["losses"].append(loss)
            frozen_bytes.append(nbytes)
        s1 = opt_fragments(self.engine, self.stage, frozen)
        drift = max([float((a - local(p)).abs().max()) for a, p in zip(w0, frozen)]
                    + [float((s0[k] - s1[k]).abs().max()) for k in s0] + [0.0])
        numel = sum(p.numel() for p in frozen)
        width = frozen[0].element_size() if frozen else 4  # gradients are reduced in the parameters' dtype
        expected = (ACCUM if self.stage == 2 else 1) * width * numel
        rec["bytes_per_rank"] = gather({"full": full_bytes, "frozen": frozen_bytes[0],
                                        "drop": full_bytes - frozen_bytes[0], "expected_drop": expected,
                                        "frozen_local_numel": numel, "fixed_set_drift": drift,
                                        "holds": [u.name for u in frozen_units if u.params]})
        # 3. layout
        units = self.mat.units
        rec["unit_params_per_rank"] = gather(sum(p.numel() for u in units.heads + units.mlp for p in u.params))
        rec["types"] = {name: type(mod).__name__ for name, mod in modules_of(self.family, self.engine.module).items()}
        replicated = torch.cat([p.detach().flatten() for n, p in self.engine.module.named_parameters()
                                if "embed" in n or "norm" in n.lower()])
        if self.topo.tp_group is not None:
            peer = replicated.clone()
            dist.broadcast(peer, src=dist.get_global_rank(self.topo.tp_group, 0), group=self.topo.tp_group)
            rec["replicated_tp_diff"] = max(gather(float((peer - replicated).abs().max())))
        rec["topology"] = self.topo.describe()
        rec["seconds"] = round(time.perf_counter() - t0, 2)
        return rec


def compare(ref: dict, tp: dict) -> dict:
    lam_err = 0.0
    for step, lams in tp["lambda"].items():
        for name, v in lams.items():
            r = ref["lambda"][step][name]
            lam_err = max(lam_err, abs(v - r) / max(abs(r), 1e-30))
    return {
        "lambda_steps": sorted(tp["lambda"]), "lambda_units": len(next(iter(tp["lambda"].values()))),
        "lambda_rel_err": lam_err,
        "lambda_tp": tp["lambda"], "lambda_ref": ref["lambda"],
        "same_lambda_keys": {s: sorted(v) for s, v in tp["lambda"].items()} == {s: sorted(v) for s, v in
                                                                             ref["lambda"].items()},
        "masks_equal_on_ranks": all(all(m == ms[0] for m in ms) for ms in tp["masks"]),
        "masks_equal_ref": [ms[0] for ms in tp["masks"]] == [ms[0] for ms in ref["masks"]],
        "masks": [ms[0] for ms in tp["masks"]],
        "frozen_params_metric": [tp["frozen_params"], ref["frozen_params"]],
        "loss_max_abs_diff": max(abs(a - b) for a, b in zip(tp["losses"], ref["losses"])),
        "losses_tp": tp["losses"], "losses_ref": ref["losses"],
        "grad_norm_max_rel_diff": max(abs(a - b) / b for a, b in zip(tp["grad_norms"], ref["grad_norms"])),
        "grad_norms_tp": tp["grad_norms"], "grad_norms_ref": ref["grad_norms"],
        "probe_equal_ref": all(torch.equal(tp["probe_batch"][k], ref["probe_batch"][k]) for k in ref["probe_batch"]),
        "probe_equal_on_ranks": tp["probe_equal_on_ranks"],
        "weight_drift": tp["weight_drift"], "state_drift": tp["state_drift"],
        "bytes_per_rank": tp["bytes_per_rank"], "bytes_per_rank_ref": ref["bytes_per_rank"],
        "unit_params_per_rank": tp["unit_params_per_rank"], "unit_params_ref": ref["unit_params_per_rank"][0],
        "types": tp["types"], "types_ref": ref["types"], "replicated_tp_diff": tp.get("replicated_tp_diff"),
        "topology": tp["topology"], "topology_ref": ref["topology"],
        "seconds_tp": tp["seconds"], "seconds_ref": ref["seconds"],
    }


def resume(stage: int, tp: int) -> dict:
    """Save a TP engine's checkpoint after 4 steps, go on 3 more; a FRESH engine (new model, same JSON) loads it and
    runs the same 3 steps: losses, λmax at the step-6 refresh, decisions and every local parameter must be
    bit-identical (DeepSpeed writes one model / optimizer file per TP rank; MAT's state rides in its client state)."""
    import shutil
    import tempfile

    box = [tempfile.mkdtemp(prefix="tp_resume_") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)

    def tail(run: Run) -> dict:
        out = {"losses": [], "lambda": {}, "masks": []}
        for step in range(4, POLICY_STEPS):
            loss, _, _ = run.step(step)
            out["losses"].append(loss)
            out["lambda"].update({k: v for k, v in run.mat.metrics().items() if "lambda_max/" in k})
            out["masks"].append(run.masks())
        out["params"] = [p.detach().clone() for p in run.engine.module.parameters()]
        return out

    first = Run("llama", stage, tp, False)
    for step in range(4):
        first.step(step)
    first.engine.save_checkpoint(box[0], tag="step4")
    a = tail(first)
    second = Run("llama", stage, tp, False)
    path, _ = second.engine.load_checkpoint(box[0], tag="step4")
    b = tail(second)
    same_params = all(torch.equal(x, y) for x, y in zip(a["params"], b["params"]))
    dist.barrier()
    files = sorted(os.listdir(os.path.join(box[0], "step4"))) if dist.get_rank() == 0 else []
    if dist.get_rank() == 0:
        shutil.rmtree(box[0], ignore_errors=True)
    return {"loaded": path is not None, "losses_equal": a["losses"] == b["losses"], "losses": a["losses"],
            "lambda_equal": a["lambda"] == b["lambda"] and bool(a["lambda"]), "masks_equal": a["masks"] == b["masks"],
            "params_equal_on_ranks": all(gather(same_params)), "topology": second.topo.describe(), "files": files}


# ----------------------------------------------------------------------------------------------------------------------
# Elastic resume across TP sizes (tests/test_universal.py): two launches, possibly of different world sizes
# ----------------------------------------------------------------------------------------------------------------------
SAVE_AT, END = 4, 10  # refreshes at 0, 3 | 6, 9: the decision of step 3 holds over steps 4, 5 of the resumed run


def _gather_uneven(parts, t, group):
    """``parts[r]`` = TP rank r's ``t`` (shapes may differ: one broadcast per rank)."""
    rank = dist.get_rank(group)
    for r in range(len(parts)):
        buf = t.clone() if r == rank else parts[r]
        dist.broadcast(buf, src=dist.get_global_rank(group, r), group=group)
        parts[r] = buf


def _autotp_dims(engine) -> dict:
    """Name -> (the dimension AutoTP split it along (LinearLayer: 0, LinearAllreduce: 1), the number of packed
    sub-parameters a shard holds: SubParamLinearLayer's ``shape`` (2, -1) for Phi-3's [gate | up], each split on its
    own, so a shard is [gate_r | up_r])."""
    from deepspeed.module_inject.layers import LinearAllreduce, LinearLayer, SubParamLinearLayer

    out = {}
    for mname, mod in engine.module.named_modules():
        if isinstance(mod, (LinearLayer, LinearAllreduce, SubParamLinearLayer)):
            packs = int(mod.shape[0]) if isinstance(mod, SubParamLinearLayer) and mod.shape[0] != -1 else 1
            for pname, _ in mod.named_parameters(recurse=False):
                is_bias = pname == "bias"
                if isinstance(mod, LinearAllreduce) and is_bias:
                    continue  # replicated
                row = isinstance(mod, LinearAllreduce) and not is_bias
                dim = int(mod.partition_dim) if isinstance(mod, SubParamLinearLayer) else (1 if row else 0)
                out[f"{mname}.{pname}"] = (dim, packs)
    return out


def whole_params(engine, tp_group) -> dict:
    """Every parameter by name, whole: a unit parameter from the TP rank that holds it (the others hold it empty),
    an AutoTP-sharded weight concatenated over the TP group along the dimension it is split on (packed
    sub-parameters each on their own), the rest as is."""
    dims = _autotp_dims(engine)
    out = {}
    for name, p in engine.module.named_parameters():
        t = p.detach().float().cpu().clone()  # a copy: the run trains on
        if tp_group is None or dist.get_world_size(tp_group) == 1:
            out[name] = t
            continue
        shapes = [None] * dist.get_world_size(tp_group)
        dist.all_gather_object(shapes, tuple(t.shape), group=tp_group)
        if name in dims or len(set(shapes)) > 1:
            parts = [torch.zeros(sh) for sh in shapes]
            _gather_uneven(parts, t, tp_group)
            if name in dims:
                dim, packs = dims[name]
                pieces = [part.chunk(packs, dim=dim) for part in parts]  # [rank][sub-parameter]
                out[name] = torch.cat([torch.cat([pc[i] for pc in pieces], dim=dim) for i in range(packs)], dim=dim)
            else:
                out[name] = next(x for x in parts if x.numel())
        else:
            out[name] = t
    return out


def continue_run(run: "Run", first: int, record_drift: bool) -> dict:
    """Steps ``first``..END-1: losses, grad norms, λmax at refreshes, masks; frozen drift until the next refresh."""
    out = {"losses": {}, "grad_norms": {}, "lambda": {}, "masks": {}, "frozen_drift": 0.0, "frozen_checked": 0}
    snap = run.mat.snapshot_frozen()
    out["frozen_checked"] = sum(1 for u in run.mat.frozen_units())
    for step in range(first, END):
        loss, _, norm = run.step(step)
        out["losses"][step], out["grad_norms"][step] = loss, norm
        metrics = run.mat.metrics()
        if "mat/refresh_seconds" in metrics:
            out["lambda"][step] = {k.rpartition("/")[2]: v for k, v in metrics.items() if "lambda_max/" in k}
            snap = None  # the decision may change here
        elif snap is not None and record_drift:
            out["frozen_drift"] = max(out["frozen_drift"], run.mat.frozen_change(snap))
        out["masks"][step] = run.masks()
    return out


def elastic(args) -> None:
    """``--elastic save``: a TP ``--tp`` engine trains to SAVE_AT, saves with ``mat_ds.checkpoint.save`` (what the
    trainer calls), records every parameter whole, and goes on uninterrupted to END. ``--elastic resume``: a fresh
    engine at ``--tp`` (any world size) resumes with ``mat_ds.checkpoint.load(..., universal="auto")`` (rank 0
    converts through DeepSpeed's universal checkpoint when the layout differs) and runs to END; rank 0 prints one
    ``ELASTIC {json}`` line comparing it with the saved state and the uninterrupted run."""
    from mat_ds import checkpoint as ck
    from mat_ds.core.engine import CLIENT_KEY as MAT_KEY

    ckpt = os.path.join(args.dir, "checkpoints")
    run = Run(args.family, args.elastic_stage, args.tp, args.mlp, args.bf16)
    tp_group = run.topo.tp_group
    rank0 = dist.get_rank() == 0
    if args.elastic == "save":
        for step in range(SAVE_AT):
            run.step(step)
            run.mat.metrics()  # consumed every step, as in continue_run (a refresh's figures stay until read)
        ck.save(run.engine, ckpt, SAVE_AT, {"step": SAVE_AT})
        weights = whole_params(run.engine, tp_group)
        frozen = sorted(u.name for u in run.mat.frozen_units())
        tail = continue_run(run, SAVE_AT, record_drift=True)
        if rank0:
            torch.save({"weights": weights, "frozen": frozen, "tail": tail, "topology": run.topo.describe(),
                        "types": {n: type(m).__name__ for n, m in modules_of(args.family, run.engine.module).items()}},
                       os.path.join(args.dir, "uninterrupted.pt"))
            print("ELASTIC_SAVED " + json.dumps({"topology": run.topo.describe(), "frozen": frozen}), flush=True)
        return
    try:
        state = ck.load(run.engine, ckpt, "auto", universal="auto")
    except ck.CheckpointError as exc:
        if rank0:
            print("ELASTIC_REFUSED " + json.dumps({"error": str(exc)}), flush=True)
        return
    loaded_mat = run.mat.state_dict()
    weights = whole_params(run.engine, tp_group)
    frozen = sorted(u.name for u in run.mat.frozen_units())
    tail = continue_run(run, SAVE_AT, record_drift=True)
    if not rank0:
        return
    ref = torch.load(os.path.join(args.dir, "uninterrupted.pt"), weights_only=False)
    tag = ck.tag_for(SAVE_AT)
    saved_sd = torch.load(os.path.join(ckpt, tag, "mp_rank_00_model_states.pt"), map_location="cpu",
                          weights_only=False)
    mat_diff = same(saved_sd[MAT_KEY], loaded_mat)
    w_ref = ref["weights"]
    weight_diff = sorted(set(w_ref) ^ set(weights)) + [
        n for n in set(w_ref) & set(weights) if w_ref[n].shape != weights[n].shape or not torch.equal(w_ref[n],
                                                                                                       weights[n])]
    steps = sorted(tail["losses"])
    r = ref["tail"]
    lam_err = max([abs(tail["lambda"][s][k] - r["lambda"][s][k]) / max(abs(r["lambda"][s][k]), 1e-30)
                   for s in set(r["lambda"]) & set(tail["lambda"]) for k in r["lambda"][s]] or [float("inf")])
    print("ELASTIC " + json.dumps({
        "client_state": state, "topology": run.topo.describe(), "topology_saved": ref["topology"],
        "converted": os.path.isdir(os.path.join(ckpt, tag + "_universal")),
        "mat_state_equal": not mat_diff, "mat_diff": mat_diff[:10],
        "frozen_saved": ref["frozen"], "frozen_loaded": frozen,
        "weights_equal": not weight_diff, "weights_differ": weight_diff[:10], "n_weights": len(weights),
        "steps": steps, "loss_max_abs_diff": max(abs(tail["losses"][s] - r["losses"][s]) for s in steps),
        "losses": [tail["losses"][s] for s in steps], "losses_ref": [r["losses"][s] for s in steps],
        "grad_norm_max_rel_diff": max(abs(tail["grad_norms"][s] - r["grad_norms"][s]) / r["grad_norms"][s]
                                      for s in steps),
        "lambda_steps": sorted(tail["lambda"]), "lambda_steps_ref": sorted(r["lambda"]), "lambda_rel_err": lam_err,
        "masks_equal": [tail["masks"][s] for s in steps] == [r["masks"][s] for s in steps],
        "masks": [tail["masks"][s] for s in steps],
        "frozen_drift": tail["frozen_drift"], "frozen_drift_ref": r["frozen_drift"],
        "frozen_units_checked": tail["frozen_checked"],
        "types": {n: type(m).__name__ for n, m in modules_of(args.family, run.engine.module).items()},
    }), flush=True)


def parse(spec: str, tp: int) -> tuple[str, int, int, bool, bool]:
    """``[family:]stage[+mlp][+bf16]`` -> the arguments of ``Run``."""
    family, _, rest = spec.rpartition(":")
    stage, *extras = rest.split("+")
    return family or "llama", int(stage), tp, "mlp" in extras, "bf16" in extras


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default="1", help="comma-separated [family:]ZeRO stage[+mlp][+bf16] (family: "
                                                     "llama, bert), or resume:stage")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--local_rank", type=int, default=-1)
    parser.add_argument("--elastic", choices=["save", "resume"], help="elastic resume across TP sizes (see elastic)")
    parser.add_argument("--elastic_stage", type=int, default=1)
    parser.add_argument("--mlp", action="store_true", help="--elastic: MLP units too")
    parser.add_argument("--bf16", action="store_true", help="--elastic: bf16 (fp32 master weights)")
    parser.add_argument("--family", default="llama", help="--elastic: llama, bert, neox or phi3")
    parser.add_argument("--dir", help="--elastic: the run directory shared by the save and resume launches")
    args = parser.parse_args()
    torch.set_num_threads(1)
    mat_ds.register_family(megatron_style.SPEC)  # family "own": a user's model, registered as a user would
    mat_ds.init_distributed()
    if args.elastic:
        elastic(args)
        dist.barrier()
        mat_ds.shutdown_distributed()
        return
    cases = args.cases.split(",")
    refs = {}
    for spec in cases:  # every reference before the first TP group exists (DeepSpeed's groups are process-wide)
        if not spec.startswith("resume:"):
            refs[spec] = Run(*parse(spec, 1)).run()
    for spec in cases:
        family, stage, _, mlp, bf16 = parse(spec, args.tp)
        base = {"case": spec, "family": family, "stage": stage, "mlp": mlp, "bf16": bf16,
                "world": dist.get_world_size(), "tp": args.tp}
        if family == "resume":
            res = {**base, **resume(stage, args.tp)}
        else:
            res = {**base, **compare(refs[spec], Run(*parse(spec, args.tp)).run())}
        if dist.get_rank() == 0:
            print("TP_CHECK " + json.dumps(res), flush=True)
        dist.barrier()
    mat_ds.shutdown_distributed()


if __name__ == "__main__":
    main()
    exit_process(0)
