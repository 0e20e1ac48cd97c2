"""MAT in real pretraining settings on 2 gloo ranks: precision x ZeRO stage x activation checkpointing.

    deepspeed --num_gpus 2 tests/scripts/precision_check.py --cases fp32:2:own:off,bf16:2:own:torch,...,errors

A case is ``precision:stage:model:ac`` (precision fp32|bf16|fp16 -- fp16 only where DeepSpeed's accelerator reports it,
``tests/hardware.py``; stage 0-3; model ``own`` = mat_ds Transformer (BERT
arch, 2 layers x 4 heads, d 32) or ``bert`` = HF BertForMaskedLM of the same size, or ``own+mlp`` / ``bert+mlp`` = the
same model with its dense MLPs converted into MAT units too (``mat_ds.convert_model(model, mlp_groups=2)``,
``"modules": ["heads", "mlp"]``, ``"mlp_groups": 2``: units ``L{l}G{g}``); ac ``off``, ``torch``
(``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`` around each own Block), ``ds`` (DeepSpeed's
``deepspeed.checkpointing.checkpoint`` around each own Block, configured from the config's ``activation_checkpointing``
block) or ``hf`` (``model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})``)).
Blocks are checkpointed in training mode only (as HF does): MAT's probe runs in eval mode and never recomputes.

Per case, one engine (``mat_ds.initialize``; micro 4, gradient_accumulation_steps 2, AdamW lr 5e-3 wd 0.01, clipping 1;
policy mat, warmup huge and refresh_interval huge until phase 4), the same seeded weights and batches as
tests/scripts/family_check.py (its helpers are imported):

0. step 0 (the engine's own refresh measures λ; nothing frozen) and step 1 (everything trains: gradient bytes);
1. heads 1 (layer 0) and 4 (layer 1) frozen through ``engine.mat.freezer.apply`` + ``policies["heads"].frozen`` for
   6 optimizer steps: (a) their model weights (bf16 under bf16; ZeRO-3: ``ds_tensor``), fp32 master and Adam
   exp_avg/exp_avg_sq fragments (read straight from DeepSpeed's optimizer: ZeRO-1/2, BF16_Optimizer, ZeRO-3) change
   by exactly 0 on every rank; (b) every other head moves; (c) ``HeadwiseLinearFn.backward`` is instrumented: in each
   (recomputed, under checkpointing) backward the weight-gradient GEMM covers exactly the trainable units (the pattern
   of computed unit gradients is recorded per call), frozen params have ``grad is None`` after every backward, the
   head-wise forwards per micro-step double under checkpointing (the recompute really ran), and gradient bytes per
   step drop by the freezing module's formula at the gradient element size. ``+mlp`` cells also freeze MLP units 1
   (layer 0, group 1) and 2 (layer 1, group 0) (``FROZEN_MLP``, the freezer's mask order heads then MLP units) and
   every check covers them: (a) for all frozen units and separately for the MLP ones; (b) over heads and MLP units;
   (c) the expected patterns include the MLP layers' 2-unit ones, and the patterns are also recorded per head-wise
   layer (``kind:layer``, from the layer's ``_plan``) and counted against THAT layer's frozen units; the byte formula
   over every frozen unit's params;
2. (d) λmax per head from ``mntk.probe_units`` on the engine (checkpointing on) vs the same with checkpointing switched
   off (must be bit-identical) vs ``tests.oracles.explicit_head_grams`` on an fp32 unpartitioned copy made before
   initialize and re-filled with the engine's weights (fp32: rel err < 1e-4; bf16/fp16: the error is reported against
   the fp32 probe of the same, bf16/fp16-rounded, weights), at step 0 (the engine's own refresh) and after training;
   ``+mlp``: the same for the MLP units (``probe_units(..., mlp=True).mlp_grams`` vs
   ``tests.oracles.explicit_unit_grams(ref, units.mlp, ...)``; keys ``{step0,trained}_mlp_*``);
3. (e) the mean loss of every step of phases 0-1 is reported (the test compares bf16/fp16 with fp32 per step); fp16
   runs DeepSpeed's dynamic loss scaling from a small scale (``FP16_BLOCK``: 2^8, window 100, hysteresis 2), so no
   step of the tiny model overflows on its own: the skipped-step count and the loss scale are reported per step;
4. (f) MAT's own policy (refresh_interval 2, warmup 0) for 6 steps with accumulation 2: a forward pre-hook records the
   frozen mask and the heads' requires_grad at every micro-step and every refresh is recorded with its micro-step:
   refreshes only at micro-step 0, the mask constant within each optimizer step (``+mlp``: the MLP mask too,
   ``policy_hook_log_mlp``);
5. overflow: one optimizer step whose first micro-batch loss is multiplied by inf. ZeRO 1-3 detect the invalid
   gradient norm and skip the step (fp32, bf16 and fp16, DeepSpeed's ``check_grad_overflow`` / the fp16 loss scaler's
   overflow check): ``engine.skipped_steps`` +1, every head's weights, fp32 master and Adam state (and Adam's
   ``step``) unchanged, while ``global_steps`` still advances by 1 (DeepSpeed's semantics; MAT's clock,
   global_steps - skipped_steps, does not); then one normal step. ``+mlp``: every MLP unit's too (``all_mlp_drift``). Under ZeRO-0 only for bf16/fp16 (DeepSpeed's
   FP16_UnfusedOptimizer checks the norm); fp32 ZeRO-0 steps torch AdamW directly, with no overflow check.

Every row carries ``fp16_supported_ranks``: ``get_accelerator().is_fp16_supported()`` asked on every rank (the same
query as ``mat_ds.initialize``'s), which the test compares with its own answer. The case ``errors`` checks one-line
ConfigErrors from ``mat_ds.initialize``: fp16 where the accelerator reports no fp16 (where it does, the same fp16
configs must be ACCEPTED, i.e. build an fp16 engine), ZeRO-Offload (offload_optimizer at stage 2 and 3, offload_param at
stage 3) with freezing; and
that policy "full" with ZeRO-Offload trains (DeepSpeed's CPUAdam when its op loads without a JIT build, else torch
AdamW; see ``cpu_adam_status``), while freezing is refused by the freezer in one line. Rank 0 prints one ``PRECISION_CHECK {json}`` line per case.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import shutil
import subprocess
import time
from types import SimpleNamespace

import deepspeed
import torch
import torch.distributed as dist

import mat_ds
from mat_ds.core.freezing import GRADIENT_OPS, comm_bytes_snapshot
from mat_ds.core.headwise import HeadwiseLinear, HeadwiseLinearFn
from mat_ds.core.mntk import lambda_max, probe_units
from mat_ds.core.units import find_units
from mat_ds.distributed import exit_process
from mat_ds.models.transformer import Block
from tests.hardware import fp16_supported
from tests.oracles import explicit_head_grams, explicit_unit_grams
from tests.scripts import family_check as fc
from tests.scripts.family_check import (ACCUM, MICRO, N_PROBE, all_max, build_model, full_numel, gather,
                                        lam_rel, local, loss_of, make_batch, model_parameters, rel)

FROZEN_HEADS = [1, fc.H]  # unit 1 of layer 0, unit 0 of layer 1
MLP_GROUPS = fc.MLP_GROUPS  # MLP units per layer in the +mlp cells (2)
FROZEN_MLP = [1, MLP_GROUPS]  # +mlp cells: MLP unit 1 (layer 0, group 1) and 2 (layer 1, group 0) too
MODELS = ("own", "bert", "own+mlp", "bert+mlp")
FULL_STEPS, FROZEN_STEPS, POLICY_STEPS, POLICY_INTERVAL = 2, 6, 6, 2
AC_KINDS = ("off", "torch", "ds", "hf")
# DeepSpeed's dynamic loss scaling from 2^8 (a scale as large as its default 2^16 risks overflowing, i.e. skipping, the
# first steps of a tiny model, as scripts/gpu_check.py notes), raised only after 100 clean steps (a cell runs 16),
# hysteresis 2: under ZeRO 1-3 the one forced overflow of phase 5 is skipped without halving the scale (without ZeRO,
# FP16_UnfusedOptimizer has no hysteresis and halves it). Every cell's only skip is thus the forced one (asserted).
FP16_BLOCK = {"enabled": True, "initial_scale_power": 8, "loss_scale_window": 100, "hysteresis": 2,
              "min_loss_scale": 1}


# ----------------------------------------------------------------------------------------------------------------------
# instrumentation: head-wise forwards and the weight-gradient GEMMs of every backward
# ----------------------------------------------------------------------------------------------------------------------
class Trace:
    """What head-wise layers did since ``reset``: training forwards, and per backward that computes weight gradients
    the tuple of units whose weight gradient it computed (the GEMM covers exactly those) and, in ``where``, which
    layer it was (``"kind:layer"`` of the head-wise linear, from ``tags``; None for a layer not registered there)."""

    forwards = 0
    backwards: list = []
    where: list = []
    tags: dict = {}  # id(module._plan) -> "heads:0" / "mlp:1": the plan is per head-wise linear and is ctx.plan

    @classmethod
    def reset(cls) -> None:
        cls.forwards, cls.backwards, cls.where = 0, [], []


_orig_backward = HeadwiseLinearFn.backward
_orig_forward = HeadwiseLinear.forward


def _traced_backward(ctx, dy):
    grads = _orig_backward(ctx, dy)
    if ctx.weight_grads:  # the probe's activation-only backward computes none (weight_grads=False)
        n = ctx.plan.n_units
        Trace.backwards.append(tuple(g is not None for g in grads[5:5 + n]))
        Trace.where.append(Trace.tags.get(id(ctx.plan)))
    return grads


def _traced_forward(self, x):
    if self.training and self.recorder is None:
        Trace.forwards += 1
    return _orig_forward(self, x)


HeadwiseLinearFn.backward = staticmethod(_traced_backward)
HeadwiseLinear.forward = _traced_forward

# Activation checkpointing of the own Transformer's blocks: per block instance (``_ac``), training mode only.
_orig_block_forward = Block.forward


def _block_forward(self, x):
    kind = getattr(self, "_ac", None)
    if kind and self.training and torch.is_grad_enabled():
        if kind == "torch":
            return torch.utils.checkpoint.checkpoint(_orig_block_forward, self, x, use_reentrant=False)
        return deepspeed.checkpointing.checkpoint(lambda h: _orig_block_forward(self, h), x)
    return _orig_block_forward(self, x)


Block.forward = _block_forward


# ----------------------------------------------------------------------------------------------------------------------
# configs and optimizer state
# ----------------------------------------------------------------------------------------------------------------------
def cell_config(prec: str, stage: int, ac: str, mlp: bool = False) -> dict:
    cfg = fc.ds_config(stage)  # micro 4, accumulation 2, AdamW (torch), clipping 1, comms logger, "mat" block
    cfg["mat"]["warmup_steps"] = 10**6  # the step-0 refresh measures λ but freezes nothing
    if mlp:  # the model's dense MLPs are MAT units too (the model is converted with the same mlp_groups)
        cfg["mat"].update({"modules": ["heads", "mlp"], "mlp_groups": MLP_GROUPS})
    if prec == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif prec == "fp16":
        cfg["fp16"] = dict(FP16_BLOCK)
    if ac == "ds":
        cfg["activation_checkpointing"] = {"partition_activations": False, "contiguous_memory_optimization": False,
                                           "cpu_checkpointing": False, "synchronize_checkpoint_boundary": False,
                                           "profile": False}
    return cfg


def opt_fragments(engine, stage: int, params) -> dict:
    """(param index, what) -> this rank's fp32 master / exp_avg / exp_avg_sq fragment. family_check's reader, plus
    DeepSpeed's BF16_Optimizer (bf16 + ZeRO-1: ``bf16_groups`` / ``fp32_groups_flat_partition``)."""
    opt = engine.optimizer
    if stage == 0 and opt is not engine.basic_optimizer:  # bf16/fp16 without ZeRO: FP16_UnfusedOptimizer's fp32 copies
        index = {id(q): (i, j) for i, g in enumerate(opt.fp16_groups) for j, q in enumerate(g)}
        out = {}
        for k, p in enumerate(params):
            i, j = index[id(p)]
            copy = opt.fp32_groups[i][j]
            state = engine.basic_optimizer.state[copy]
            out[(k, "fp32")] = copy.detach().view(-1).clone()
            for name in ("exp_avg", "exp_avg_sq"):
                out[(k, name)] = state[name].view(-1).clone()
        return out
    if not hasattr(opt, "bf16_groups") or hasattr(opt, "bit16_groups"):
        return fc.opt_fragments(engine, stage, params)
    group_of = {id(q): i for i, g in enumerate(opt.bf16_groups) for q in g}
    out = {}
    for k, p in enumerate(params):
        mapping = getattr(p, "_hp_mapping", None)
        if not mapping:
            continue
        address = mapping.get_hp_fragment_address()
        start, numel = int(address.start), int(address.numel)
        flat = opt.fp32_groups_flat_partition[group_of[id(p)]]
        state = opt.optimizer.state[flat]
        out[(k, "fp32")] = flat.detach().view(-1)[start:start + numel].clone()
        for name in ("exp_avg", "exp_avg_sq"):
            out[(k, name)] = state[name].view(-1)[start:start + numel].clone()
    return out


def drift(before: dict, after: dict) -> dict:
    assert before.keys() == after.keys()
    return {what: max([float((before[k] - after[k]).abs().max()) for k in before if k[1] == what] or [0.0])
            for what in ("fp32", "exp_avg", "exp_avg_sq")}


def adam_step(engine) -> float | None:
    for state in engine.basic_optimizer.state.values():
        if "step" in state:
            return float(state["step"])
    return None


def maxabs(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| (0 for empty tensors: a ZeRO-3 rank may hold nothing of a small parameter)."""
    return float((a - b).abs().max()) if a.numel() else 0.0


def loss_scale(engine) -> float | None:
    """The current (dynamic) loss scale of DeepSpeed's optimizer wrapper (1.0 without fp16; None if it has none)."""
    for name in ("cur_scale", "loss_scale"):  # ZeRO 1-3 / FP16_UnfusedOptimizer
        value = getattr(engine.optimizer, name, None)
        if isinstance(value, (int, float)) or torch.is_tensor(value):
            return float(value)
    return None


def one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


# ----------------------------------------------------------------------------------------------------------------------
# one case
# ----------------------------------------------------------------------------------------------------------------------
class Cell:
    def __init__(self, prec: str, stage: int, model_name: str, ac: str):
        assert ac in AC_KINDS and model_name in MODELS
        self.prec, self.stage, self.model_name, self.ac = prec, stage, model_name, ac
        self.family, _, extra = model_name.partition("+")  # "own+mlp": the own Transformer with MLP units
        self.mlp = extra == "mlp"
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.probe = make_batch(7, N_PROBE, False)
        self.micro = [make_batch(1000 + 10 * self.rank + m, MICRO, False) for m in range(ACCUM)]
        self.cfg = cell_config(prec, stage, ac, self.mlp)
        model = build_model(self.family, 1)
        if ac == "hf":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        mat_ds.convert_model(model, mlp_groups=MLP_GROUPS if self.mlp else None)
        # fp32, unpartitioned copy of the converted model (before DeepSpeed casts / partitions it): the oracle's model
        self.ref = copy.deepcopy(model)
        self.ref_units = find_units(self.ref)
        if ac == "ds":
            deepspeed.checkpointing.configure(None, deepspeed_config=self.cfg)
        self.set_ac(model, ac)
        self.engine, *_ = mat_ds.initialize(model=model, model_parameters=model_parameters(self.family, model),
                                            config=self.cfg, probe_batch=self.probe)
        assert self.engine.zero_optimization_stage() == stage
        self.mat = self.engine.mat
        self.units = self.mat.units
        assert bool(self.units.mlp) == self.mlp and len(self.ref_units.mlp) == len(self.units.mlp)
        Trace.tags = {id(m._plan): f"{m.kind}:{int(m.layer)}" for m in self.engine.module.modules()
                      if isinstance(m, HeadwiseLinear)}
        self.micro_idx = -1
        self.hook_log: list = []
        self.hook_log_mlp: list = []
        self.refresh_log: list = []
        self.engine.module.register_forward_pre_hook(self._record_mask)
        orig_refresh = self.mat.refresh

        def refresh(step):
            self.refresh_log.append([int(self.engine.global_steps), self.micro_idx])
            return orig_refresh(step)

        self.mat.refresh = refresh  # the controller's hook calls self.refresh(step)

    # -- activation checkpointing on/off ------------------------------------------------------------------------------
    def set_ac(self, model, ac: str) -> None:
        if self.family == "own":
            for block in model.blocks:
                block._ac = ac if ac in ("torch", "ds") else None
        elif ac == "hf":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_disable()

    def _record_mask(self, module, _args):
        if module.training:  # the probe's forwards run in eval mode
            mask = self.mat.frozen_mask("heads").tolist()
            req = [not any(p.requires_grad for p in u.params) for u in self.units.heads]
            self.hook_log.append([int(self.engine.global_steps), self.micro_idx, mask, req])
            if self.mlp:
                mask = self.mat.frozen_mask("mlp").tolist()
                req = [not any(p.requires_grad for p in u.params) for u in self.units.mlp]
                self.hook_log_mlp.append([int(self.engine.global_steps), self.micro_idx, mask, req])

    # -- training -----------------------------------------------------------------------------------------------------
    def train_step(self, frozen_params=(), inf_first=False) -> dict:
        before = comm_bytes_snapshot()
        Trace.reset()
        total, grads_none = 0.0, True
        for m, batch in enumerate(self.micro):
            self.micro_idx = m
            loss = loss_of(self.engine, self.family, batch)
            total += float(loss.detach())
            if inf_first and m == 0:
                loss = loss * float("inf")
            self.engine.backward(loss)
            grads_none &= all(p.grad is None for p in frozen_params)
            self.engine.step()
        self.micro_idx = -1
        after = comm_bytes_snapshot()
        mean = torch.tensor([total / ACCUM], dtype=torch.float64)
        dist.all_reduce(mean)
        return {"loss": float(mean) / self.world, "skipped_steps": int(self.engine.skipped_steps),
                "loss_scale": loss_scale(self.engine),
                "grad_bytes": sum(after[k] - before.get(k, 0) for k in after if k in GRADIENT_OPS),
                "forwards": Trace.forwards, "backwards": list(Trace.backwards), "where": list(Trace.where),
                "frozen_grads_none": grads_none}

    def set_frozen(self, heads: list[int], mlp: list[int] = ()) -> None:
        nh, nm = len(self.units.heads), len(self.units.mlp)
        mask = torch.zeros(nh + nm, dtype=torch.bool)  # the freezer's order: heads, then MLP units (no experts here)
        mask[heads] = True
        mask[[nh + g for g in mlp]] = True
        self.mat.freezer.apply(mask)
        self.mat.policies["heads"].frozen = mask[:nh].clone()  # MAT's own view (and what it would refresh from)
        if nm:
            self.mat.policies["mlp"].frozen = mask[nh:].clone()

    # -- λmax ---------------------------------------------------------------------------------------------------------
    def sync_ref(self) -> None:
        """Copy the engine's current weights (upcast to fp32; ZeRO-3: gathered) into the reference copy."""
        params = list(self.engine.module.parameters())
        ctx = deepspeed.zero.GatheredParameters(params) if self.stage == 3 else contextlib.nullcontext()
        with ctx, torch.no_grad():
            named = dict(self.ref.named_parameters())
            for name, p in self.engine.module.named_parameters():
                named[name].copy_(p.data.float())

    def probe_engine(self):
        """The engine's UnitProbe (``head_grams``; ``mlp_grams`` in +mlp cells, None otherwise)."""
        result = probe_units(self.engine.module, self.units, self.probe, self.mat.probe_fn, mlp=self.mlp)
        if self.stage == 3:
            self.engine.empty_partition_cache()
        return result

    def reference(self) -> dict:
        """kind -> (explicit-Jacobian Grams, fp32 fast-path probe Grams) of the reference copy's weights."""
        oracle = explicit_head_grams(self.ref, self.ref_units, self.probe, self.mat.probe_fn)
        fast = probe_units(self.ref, self.ref_units, self.probe, self.mat.probe_fn, mlp=self.mlp)
        out = {"heads": (oracle, fast.head_grams)}
        if self.mlp:
            out["mlp"] = (explicit_unit_grams(self.ref, self.ref_units.mlp, self.probe, self.mat.probe_fn),
                          fast.mlp_grams)
        return out

    def compare(self, result, prefix: str, res: dict) -> None:
        """λ / Gram errors of a UnitProbe's heads (keys ``{prefix}_...``) and, in +mlp cells, of its MLP units
        (``{prefix}_mlp_...``)."""
        for kind, (oracle, fast) in self.reference().items():
            grams = result.head_grams if kind == "heads" else result.mlp_grams
            key = prefix if kind == "heads" else f"{prefix}_mlp"
            res[f"{key}_lam_rel_err_oracle"] = lam_rel(grams, oracle)
            res[f"{key}_gram_rel_err_oracle"] = rel(grams, oracle)
            res[f"{key}_lam_rel_err_fp32_probe"] = lam_rel(grams, fast)
            res[f"{key}_ref_probe_lam_rel_err_oracle"] = lam_rel(fast, oracle)  # the fp32 probe itself is exact
            res[f"{key}_lam"] = lambda_max(grams).tolist()

    def wgrad_by_layer(self, steps: list, full: dict, frozen_steps: list, frozen_units: list, res: dict) -> None:
        """+mlp cells: the weight-gradient patterns per head-wise layer tag ("heads:0", "mlp:1", ...), so that each
        layer is checked against ITS frozen units: per tag the patterns seen everything-trains / frozen and the
        expected frozen one, the calls per step, and how many frozen units' (resp. trainable units') weight gradients
        were computed (resp. skipped) in the frozen steps, recomputed backwards included."""
        n_units, linears = {}, {}
        for m in self.engine.module.modules():
            if isinstance(m, HeadwiseLinear):
                tag = Trace.tags[id(m._plan)]
                n_units[tag] = m.n_units
                linears[tag] = linears.get(tag, 0) + 1
        frozen = {tag: {u.index for u in frozen_units if f"{u.kind}:{u.layer}" == tag} for tag in n_units}
        expected = {tag: str(tuple(i not in frozen[tag] for i in range(n))) for tag, n in n_units.items()}

        def by_tag(step_list):
            return {tag: sorted({str(p) for s in step_list for p, w in zip(s["backwards"], s["where"]) if w == tag})
                    for tag in n_units}

        res["wgrad_layer_tags"] = sorted(n_units)
        res["headwise_linears_by_tag"] = linears
        res["wgrad_untagged_calls"] = sum(1 for s in steps for w in s["where"] if w not in n_units)
        res["wgrad_calls_by_tag_per_step"] = {tag: [sum(1 for w in s["where"] if w == tag) for s in steps]
                                              for tag in n_units}
        res["wgrad_patterns_full_by_tag"] = by_tag([full])
        res["wgrad_patterns_frozen_by_tag"] = by_tag(frozen_steps)
        res["wgrad_patterns_expected_frozen_by_tag"] = {tag: [p] for tag, p in expected.items()}
        computed = skipped = 0
        for s in frozen_steps:
            for pat, tag in zip(s["backwards"], s["where"]):
                computed += sum(1 for i in frozen.get(tag, ()) if pat[i])
                skipped += sum(1 for i in range(len(pat)) if i not in frozen.get(tag, ()) and not pat[i])
        res["wgrad_frozen_units_computed"] = computed  # (backward call, frozen unit) pairs with a weight gradient
        res["wgrad_trainable_units_skipped"] = skipped
        res["wgrad_frozen_mlp_units_computed"] = sum(
            1 for s in frozen_steps for pat, tag in zip(s["backwards"], s["where"]) if tag and tag.startswith("mlp:")
            for i in frozen[tag] if pat[i])

    # -- the whole case -----------------------------------------------------------------------------------------------
    def run(self) -> dict:
        t0 = time.perf_counter()
        units = self.units
        n_heads = len(units.heads)
        res: dict = {"prec": self.prec, "stage": self.stage, "model": self.model_name, "ac": self.ac,
                     "world": self.world, "accum": ACCUM, "optimizer": type(self.engine.optimizer).__name__,
                     "param_dtype": str(next(self.engine.module.parameters()).dtype)}
        # 0. step 0 (the engine's own refresh at its first micro-batch) and step 1, everything trains
        self.sync_ref()
        steps = [self.train_step()]
        res["engine_refresh_at_step0"] = self.mat.last_probe is not None
        self.compare(self.mat.last_probe, "step0", res)  # +mlp: the engine's refresh measured the MLP units too
        if self.mlp:
            res["engine_step0_mlp_grams"] = self.mat.last_probe.mlp_grams is not None
        steps.append(self.train_step())
        full = steps[-1]

        # 1. a fixed frozen set (+mlp: FROZEN_MLP too)
        frozen_mlp = FROZEN_MLP if self.mlp else []
        self.set_frozen(FROZEN_HEADS, frozen_mlp)
        frozen_units = [units.heads[i] for i in FROZEN_HEADS] + [units.mlp[g] for g in frozen_mlp]
        trained = [u for i, u in enumerate(units.heads) if i not in FROZEN_HEADS] \
            + [u for g, u in enumerate(units.mlp) if g not in frozen_mlp]
        frozen_params = [p for u in frozen_units for p in u.params]
        n_head_params = sum(len(u.params) for u in frozen_units if u.kind == "heads")  # mlp params come after them
        res["requires_grad_off"] = all(gather(all(not p.requires_grad for p in frozen_params)))
        w_frozen = [local(p).detach().clone() for p in frozen_params]
        w_trained = [[local(p).detach().clone() for p in u.params] for u in trained]
        s_frozen = opt_fragments(self.engine, self.stage, frozen_params)
        snap = self.mat.snapshot_frozen()
        frozen_steps = [self.train_step(frozen_params) for _ in range(FROZEN_STEPS)]
        steps += frozen_steps
        # (a) frozen: weights, fp32 master, Adam moments, per rank
        w_drift = max(maxabs(a, local(p)) for a, p in zip(w_frozen, frozen_params))
        s_drift = drift(s_frozen, opt_fragments(self.engine, self.stage, frozen_params))
        per_rank = gather({"weights": w_drift, **s_drift, "fragment_numel": sum(
            v.numel() for k, v in s_frozen.items() if k[1] == "fp32")})
        res["frozen_drift_per_rank"] = per_rank
        res["frozen_weight_drift"] = max(r["weights"] for r in per_rank)
        res["frozen_state_drift"] = {w: max(r[w] for r in per_rank) for w in ("fp32", "exp_avg", "exp_avg_sq")}
        res["frozen_numel_global"] = sum(full_numel(p) for p in frozen_params)
        res["frozen_change_api"] = self.mat.frozen_change(snap)
        if self.mlp:  # the same, for the frozen MLP units alone (their params follow the heads' in frozen_params)
            s_after = opt_fragments(self.engine, self.stage, frozen_params)
            mlp_keys = [k for k in s_frozen if k[0] >= n_head_params]
            res["frozen_units"] = [u.name for u in frozen_units]
            res["frozen_units_api"] = [u.name for u in self.mat.frozen_units()]
            res["frozen_mlp_mask"] = self.mat.frozen_mask("mlp").tolist()
            res["frozen_mlp_drift_per_rank"] = gather({
                "weights": max([maxabs(a, local(p)) for a, p in zip(w_frozen[n_head_params:],
                                                                    frozen_params[n_head_params:])] or [0.0]),
                **drift({k: s_frozen[k] for k in mlp_keys}, {k: s_after[k] for k in mlp_keys}),
                "fragment_numel": sum(s_frozen[k].numel() for k in mlp_keys if k[1] == "fp32")})
            res["frozen_mlp_numel_global"] = sum(full_numel(p) for p in frozen_params[n_head_params:])
        # (b) every other unit (head; +mlp: MLP unit) moved (max over ranks: under ZeRO-3 a rank may hold nothing of a
        # small param)
        moved = all_max([max(maxabs(a, local(p)) for a, p in zip(before, u.params))
                         for before, u in zip(w_trained, trained)])
        res["trained_min_change"] = min(moved)
        res["trained_unmoved"] = [u.name for u, m in zip(trained, moved) if m <= 0.0]
        if self.mlp:
            res["trained_units"] = [u.name for u in trained]
            res["trained_mlp_min_change"] = min(m for u, m in zip(trained, moved) if u.kind == "mlp")
        # (c) no weight gradient for frozen units, also in the recomputed backward
        expected = [tuple(i not in FROZEN_HEADS for i in range(l * fc.H, (l + 1) * fc.H)) for l in range(fc.L)]
        if self.mlp:  # the MLP layers' 2-unit patterns: layer 0 (True, False), layer 1 (False, True)
            expected += [tuple(g not in frozen_mlp for g in range(l * MLP_GROUPS, (l + 1) * MLP_GROUPS))
                         for l in range(fc.L)]
        res["wgrad_patterns_full"] = sorted({str(p) for p in full["backwards"]})
        res["wgrad_patterns_frozen"] = sorted({str(p) for s in frozen_steps for p in s["backwards"]})
        res["wgrad_patterns_expected_frozen"] = sorted({str(p) for p in expected})
        res["wgrad_calls_per_step"] = [len(s["backwards"]) for s in steps]
        res["wgrad_frozen_computed"] = sum(1 for s in frozen_steps for pat in s["backwards"]
                                           if pat not in expected)
        res["headwise_forwards_per_step"] = [s["forwards"] for s in steps]
        res["headwise_linears"] = sum(1 for m in self.engine.module.modules() if isinstance(m, HeadwiseLinear))
        if self.mlp:
            self.wgrad_by_layer(steps, full, frozen_steps, frozen_units, res)
        res["frozen_grads_none"] = all(gather(all(s["frozen_grads_none"] for s in frozen_steps)))
        dropped = SimpleNamespace(stage=self.stage, world=self.world)
        res["grad_bytes_per_rank"] = gather({
            "full": full["grad_bytes"], "frozen": [s["grad_bytes"] for s in frozen_steps],
            "drop": full["grad_bytes"] - frozen_steps[-1]["grad_bytes"],
            "expected_drop_fp32": fc.Case.expected_drop(dropped, frozen_params),
            **({"expected_drop_fp32_mlp": fc.Case.expected_drop(dropped, frozen_params[n_head_params:])}
               if self.mlp else {})})
        # 2. (d) λmax after training: checkpointing on vs off vs explicit Jacobian vs the fp32 probe
        self.sync_ref()
        probe_ac = self.probe_engine()
        self.set_ac(self.engine.module, "off")
        probe_noac = self.probe_engine()
        self.set_ac(self.engine.module, self.ac)
        res["trained_ac_vs_noac_max_abs"] = float((probe_ac.head_grams - probe_noac.head_grams).abs().max())
        if self.mlp:
            res["trained_mlp_ac_vs_noac_max_abs"] = float((probe_ac.mlp_grams - probe_noac.mlp_grams).abs().max())
        self.compare(probe_ac, "trained", res)
        # 3. (e) losses of the fixed-mask phases
        res["losses"] = [s["loss"] for s in steps]
        res["skipped_steps_per_step"] = [s["skipped_steps"] for s in steps]  # cumulative, after each step
        res["loss_scale_per_step"] = [s["loss_scale"] for s in steps]

        # 4. (f) MAT's own policy with refreshes under gradient accumulation
        self.mat.cfg.refresh_interval, self.mat.cfg.warmup_steps = POLICY_INTERVAL, 0
        self.hook_log, self.hook_log_mlp, self.refresh_log = [], [], []
        policy_drift = 0.0
        for _ in range(POLICY_STEPS):
            refreshing = self.mat.is_refresh_step(int(self.engine.global_steps))
            snap = None if refreshing else self.mat.snapshot_frozen()
            self.train_step()
            if not refreshing:
                policy_drift = max(policy_drift, self.mat.frozen_change(snap))
        res["policy_hook_log"] = list(self.hook_log)
        if self.mlp:
            res["policy_hook_log_mlp"] = list(self.hook_log_mlp)
        res["policy_refresh_log"] = list(self.refresh_log)
        res["policy_frozen_drift"] = policy_drift
        res["skipped_steps_before_overflow"] = int(self.engine.skipped_steps)
        self.mat.cfg.refresh_interval = 10**6

        # 5. overflow -> skipped step (ZeRO 1-3, and bf16/fp16 without ZeRO: FP16_UnfusedOptimizer checks it too)
        if self.stage > 0 or self.prec != "fp32":
            res["overflow"] = self.overflow_step(n_heads)
        res["seconds"] = time.perf_counter() - t0
        return res

    def overflow_step(self, n_heads: int) -> dict:
        frozen = self.mat.frozen_mask("heads")
        params = [p for u in self.units.heads for p in u.params]
        frozen_params = [p for u, f in zip(self.units.heads, frozen) if f for p in u.params]
        w0 = [local(p).detach().clone() for p in params]
        s0 = opt_fragments(self.engine, self.stage, params)
        mlp_params = [p for u in self.units.mlp for p in u.params]
        wm0 = [local(p).detach().clone() for p in mlp_params]
        sm0 = opt_fragments(self.engine, self.stage, mlp_params) if self.mlp else {}
        skipped0, global0, adam0 = self.engine.skipped_steps, int(self.engine.global_steps), adam_step(self.engine)
        mat_step0 = self.mat.step
        scale0 = loss_scale(self.engine)
        refreshes0 = len(self.refresh_log)
        step = self.train_step(frozen_params, inf_first=True)
        out = {"skipped_steps_delta": self.engine.skipped_steps - skipped0,
               "global_steps_delta": int(self.engine.global_steps) - global0,
               "mat_step_delta": self.mat.step - mat_step0,
               "adam_step_before": adam0, "adam_step_after": adam_step(self.engine),
               "refreshed": len(self.refresh_log) > refreshes0,
               "loss_scale_before": scale0, "loss_scale_after": loss_scale(self.engine),
               "loss_finite_before_inf": math.isfinite(step["loss"]),
               "frozen_heads": int(frozen.sum())}
        w_drift = max(maxabs(a, local(p)) for a, p in zip(w0, params))
        s_drift = drift(s0, opt_fragments(self.engine, self.stage, params))
        per_rank = gather({"weights": w_drift, **s_drift})
        out["all_heads_drift"] = {k: max(r[k] for r in per_rank) for k in per_rank[0]}
        if self.mlp:  # every MLP unit untouched by the skipped step too
            out["frozen_mlp"] = int(self.mat.frozen_mask("mlp").sum())
            w_drift = max(maxabs(a, local(p)) for a, p in zip(wm0, mlp_params))
            s_drift = drift(sm0, opt_fragments(self.engine, self.stage, mlp_params))
            per_rank = gather({"weights": w_drift, **s_drift})
            out["all_mlp_drift"] = {k: max(r[k] for r in per_rank) for k in per_rank[0]}
        # training goes on afterwards: the next (finite) step moves the trainable heads, not the frozen ones
        w1 = [local(p).detach().clone() for p in params]
        snap = self.mat.snapshot_frozen()
        after = self.train_step(frozen_params)
        moved = all_max([max(maxabs(a, local(p)) for a, p in zip(w1, params))])
        out["next_step_loss"] = after["loss"]
        out["next_step_moved"] = moved[0]
        out["next_step_frozen_change"] = self.mat.frozen_change(snap)
        out["next_skipped_steps_delta"] = self.engine.skipped_steps - skipped0
        out["next_loss_scale"] = loss_scale(self.engine)
        return out


# ----------------------------------------------------------------------------------------------------------------------
# refusals and ZeRO-Offload
# ----------------------------------------------------------------------------------------------------------------------
def cpu_adam_status() -> dict:
    """Whether DeepSpeed's CPUAdam op can be used WITHOUT a JIT build in this run (pre-installed, or already built in
    the torch extensions cache). Its JIT build (g++ of cpu_adam.cpp, ~1.5 GB per compiler) is not started here."""
    from deepspeed.git_version_info import installed_ops
    from deepspeed.ops.op_builder import CPUAdamBuilder
    from torch.utils.cpp_extension import _get_build_directory

    builder = CPUAdamBuilder()
    if not installed_ops.get(builder.name):
        # torch's JIT load runs `ninja -v` in the build directory: up to date only if the cached build was made with
        # the same ninja/flags (measured here: a rebuild whenever PATH picked another ninja, 6-8 min each).
        build_dir = _get_build_directory(builder.name, False)
        up_to_date = False
        if os.path.exists(os.path.join(build_dir, builder.name + ".so")) and shutil.which("ninja"):
            dry = subprocess.run(["ninja", "-n"], cwd=build_dir, capture_output=True, text=True, timeout=60)
            up_to_date = dry.returncode == 0 and "no work to do" in dry.stdout
        if not up_to_date:
            return {"available": False,
                    "reason": "DeepSpeed's cpu_adam op is not pre-installed and its JIT build is not cached up to date "
                              "(a JIT build of cpu_adam takes 6-8 min on this 2-core machine): CPUAdam sub-case "
                              "skipped, ZeRO-Offload runs with torch AdamW"}
    try:
        t = time.perf_counter()
        builder.load()
        return {"available": True, "load_seconds": round(time.perf_counter() - t, 1)}
    except Exception as exc:  # noqa: BLE001
        return {"available": False, "reason": one_line(exc)[:300]}


def errors_case() -> dict:
    base = lambda stage, **kw: {**fc.ds_config(stage), **kw}  # noqa: E731
    refused = {}

    def try_init(cfg: dict):
        model = build_model("own", 1)
        try:
            return mat_ds.initialize(model=model, model_parameters=model_parameters("own", model), config=cfg,
                                     probe_batch=make_batch(7, N_PROBE, False))[0], None
        except mat_ds.ConfigError as exc:
            return None, str(exc)
        except Exception as exc:  # noqa: BLE001 - reported, the test fails on it
            return None, "NOT A ConfigError: " + one_line(exc)

    def offload(stage: int, **zero) -> dict:
        cfg = fc.ds_config(stage)
        cfg["zero_optimization"].update(zero)
        return cfg

    cases = {
        "fp16_zero0": base(0, fp16={"enabled": True}),
        "fp16_zero1": base(1, fp16={"enabled": True}),
        "fp16_zero2": base(2, fp16={"enabled": True}),
        "offload_optimizer_zero2": offload(2, offload_optimizer={"device": "cpu"}),
        "offload_optimizer_zero3": offload(3, offload_optimizer={"device": "cpu"}),
        "offload_param_zero3": offload(3, offload_param={"device": "cpu"}),
    }
    accepted = {}  # fp16 where the accelerator has it: the same configs must build an fp16 engine
    for name, cfg in cases.items():
        engine, msg = try_init(cfg)
        refused[name] = msg if engine is None else "NOT REFUSED"
        if engine is not None and name.startswith("fp16"):
            accepted[name] = {"param_dtype": str(next(engine.module.parameters()).dtype),
                              "stage": int(engine.zero_optimization_stage()),
                              "optimizer": type(engine.optimizer).__name__}
        del engine
    res: dict = {"case": "errors", "refused": refused, "fp16_accepted": accepted}

    # policy "full" with ZeRO-Offload: runs (DeepSpeed's CPUAdam if its op builds/loads here, else torch AdamW)
    res["cpu_adam"] = cpu_adam_status()
    runs = {}
    for name, stage, zero in (("full_offload_optimizer_zero2", 2, {"offload_optimizer": {"device": "cpu"}}),
                              ("full_offload_param_optimizer_zero3", 3, {"offload_optimizer": {"device": "cpu"},
                                                                         "offload_param": {"device": "cpu"}})):
        cfg = offload(stage, **zero)
        cfg["mat"] = {"policy": "full", "probe_samples": N_PROBE}
        if res["cpu_adam"]["available"]:
            cfg["optimizer"]["params"].pop("torch_adam")
        else:
            cfg["zero_force_ds_cpu_optimizer"] = False
        engine, msg = try_init(cfg)
        if engine is None:
            runs[name] = {"error": msg}
            continue
        run = {"inner_optimizer": type(engine.basic_optimizer).__name__}
        micro = [make_batch(1000 + 10 * dist.get_rank() + m, MICRO, False) for m in range(ACCUM)]
        before = [local(p).detach().clone() for p in engine.module.parameters()]
        losses = []
        for _ in range(2):
            total = 0.0
            for batch in micro:
                loss = engine(batch["input_ids"], batch["labels"])
                engine.backward(loss)
                engine.step()
                total += float(loss.detach())
            losses.append(total / ACCUM)
        run["losses"] = losses
        run["moved"] = all_max([max(maxabs(a, local(p)) for a, p in zip(before, engine.module.parameters()))])[0]
        run["frozen_heads"] = int(engine.mat.frozen_mask("heads").sum())
        mask = torch.zeros(len(engine.mat.units.heads), dtype=torch.bool)
        mask[0] = True
        try:
            engine.mat.freezer.apply(mask)
            run["freezer_refusal"] = None
        except NotImplementedError as exc:
            run["freezer_refusal"] = str(exc)
        runs[name] = run
        del engine
    res["offload_full_runs"] = runs
    return res


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default="fp32:2:own:off", help="comma-separated prec:stage:model:ac, or errors")
    parser.add_argument("--local_rank", type=int, default=-1)
    args = parser.parse_args()
    mat_ds.init_distributed()
    rank = dist.get_rank()
    for spec in args.cases.split(","):
        if spec == "errors":
            res = errors_case()
        else:
            prec, stage, model_name, ac = spec.split(":")
            cell = Cell(prec, int(stage), model_name, ac)
            res = cell.run()
            del cell
        res["spec"] = spec
        res["fp16_supported_ranks"] = gather(fp16_supported())  # the same query as mat_ds.initialize's, per rank
        if rank == 0:
            print("PRECISION_CHECK " + json.dumps(res), flush=True)
        dist.barrier()
    mat_ds.shutdown_distributed()


if __name__ == "__main__":
    main()
    exit_process(0)  # no interpreter teardown after the work is done: see mat_ds.distributed.exit_process
