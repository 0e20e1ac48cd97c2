"""Per-family acceptance checks of MAT through ``mat_ds.initialize`` on real DeepSpeed engines (2 gloo ranks).

    deepspeed --num_gpus 2 tests/scripts/family_check.py --cases own:2,bert:2,switch:2:1,switch:2:2,gpt2:3

A case is ``family[+mlp]:stage[:ep_size]``; ``+mlp`` also converts the dense MLPs into MAT units (``"modules":
["heads", "mlp"]``, ``mlp_groups`` 2) and checks them like heads (λ, freezing, gradient bytes); families: ``own`` (mat_ds Transformer, BERT arch), ``bert`` (HF
BertForMaskedLM), ``gpt2`` (HF GPT2LMHeadModel), ``llama`` (HF LlamaForCausalLM, 4 heads / 2 KV heads = 2 units per
layer), ``switch`` (the own Transformer with 4 deepspeed.moe experts in every block; ep_size 1 or 2). All tiny, fp32,
dropout 0, seeded identically on every rank. Per case, ONE engine (``mat_ds.initialize`` with a "mat" block: policy
mat, warmup 0, refresh_interval huge so that only step 0 refreshes until the script says otherwise):

1. λmax / Gram per unit from ``mntk.probe_units`` against ``tests.oracles`` (explicit per-sample parameter Jacobians;
   under ZeRO-3 on an unpartitioned copy of the converted model, re-filled with the gathered weights later): at
   init, from the engine's own step-0 refresh (``engine.mat.last_probe``), and after training (weights moved, some
   units frozen);
2. step 0 (MAT's refresh may freeze units), then everything unfrozen for 2 steps, then a fixed set frozen through
   ``engine.mat.freezer.apply`` for 3 steps: frozen units' local weights (ZeRO-3: ``ds_tensor``) and their fp32 master
   / exp_avg / exp_avg_sq fragments (read here straight from the ZeRO optimizer, not through FreezeController) must
   not change at all on any rank; every other unit must move;
3. gradient bytes per optimizer step (comms logger, ``GRADIENT_OPS``) unfrozen vs frozen on the same batches, per
   rank, against the freezing module's formula (stage 0: 4·N; stage 2: A·4·N; stage 3: A·4·Σ ceil(numel/W)·W; N the
   frozen numel this rank holds);
4. 15 more steps with MAT's own policy refreshing every 4 steps: loss on the fixed batches falls; while the policy's
   frozen set holds, ``engine.mat.frozen_change`` stays 0.

Switch cases also check that MoE + ZeRO-3 is refused by ``mat_ds.initialize`` with a one-line ConfigError.
Rank 0 prints one ``FAMILY_CHECK {json}`` line per case.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time

import deepspeed
import torch
import torch.distributed as dist

import mat_ds
from mat_ds.config import ModelConfig
from mat_ds.core.experts import record_routes
from mat_ds.core.freezing import GRADIENT_OPS, comm_bytes_snapshot
from mat_ds.core.mntk import lambda_max, probe_units
from mat_ds.core.units import find_units
from mat_ds.distributed import exit_process
from mat_ds.models.transformer import Transformer
from tests.oracles import explicit_expert_grams, explicit_head_grams, explicit_unit_grams

V, T, D, L, H = 100, 16, 32, 2, 4
N_PROBE, MICRO, ACCUM = 6, 4, 2
LR, WD = 5e-3, 0.01
E = 4  # experts per MoE layer
MLP_GROUPS = 2  # MLP units per layer in the +mlp cases
PHASE_FULL, PHASE_FROZEN, PHASE_POLICY, POLICY_INTERVAL = 2, 3, 15, 4
CAUSAL = {"own": False, "switch": False, "bert": False, "gpt2": True, "llama": True, "neox": True, "phi3": True}


# ----------------------------------------------------------------------------------------------------------------------
# models, batches, configs
# ----------------------------------------------------------------------------------------------------------------------
def own_config(ep: int = 1, experts: int = 0) -> ModelConfig:
    moe = dict(moe_num_experts=experts, moe_ep_size=ep, moe_layer_interval=1) if experts else {}
    return ModelConfig(arch="bert", n_layer=L, n_head=H, d_model=D, dropout=0.0, **moe)


def build_model(family: str, ep: int) -> torch.nn.Module:
    torch.manual_seed(0)  # identical initial weights on every rank
    if family == "own":
        return Transformer(own_config(), V, T)
    if family == "switch":
        return Transformer(own_config(ep, E), V, T)
    import transformers

    if family == "bert":
        return transformers.BertForMaskedLM(transformers.BertConfig(
            vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=H, intermediate_size=64,
            max_position_embeddings=T, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    if family == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=V, n_embd=D, n_layer=L, n_head=H, n_positions=T, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0))
    if family == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=H, num_key_value_heads=2,
            intermediate_size=64, max_position_embeddings=T, attention_dropout=0.0))
    if family == "neox":  # fused per-head [q|k|v] query_key_value, 4 heads = 4 units per layer
        return transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
            vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=H, intermediate_size=64,
            max_position_embeddings=T, attention_dropout=0.0, hidden_dropout=0.0))
    if family == "phi3":  # fused blocked [Q|K|V] qkv_proj, 4 heads / 2 KV heads = 2 units per layer
        return transformers.Phi3ForCausalLM(transformers.Phi3Config(
            vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=H, num_key_value_heads=2,
            intermediate_size=64, max_position_embeddings=T, attention_dropout=0.0, resid_pdrop=0.0,
            embd_pdrop=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2))
    raise ValueError(f"unknown family {family!r}")


def make_batch(seed: int, n: int, causal: bool) -> dict:
    """n samples with labels: causal LM labels = input_ids; masked LM: -100 except ~25% targets (>= 1 per sample)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (n, T), generator=g)
    if causal:
        return {"input_ids": ids, "labels": ids.clone()}
    target = torch.rand(n, T, generator=g) < 0.25
    target[:, 1] = True
    return {"input_ids": ids, "labels": torch.where(target, ids, torch.full_like(ids, -100))}


def ds_config(stage: int, mlp: bool = False) -> dict:
    zero: dict = {"stage": stage}
    if stage == 3:  # really partition every (tiny) parameter, and split the fp32 master into several sub-groups
        zero.update({"stage3_param_persistence_threshold": 0, "sub_group_size": 4000})
    return {
        "train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": ACCUM, "gradient_clipping": 1.0,
        "steps_per_print": 10**9,
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": WD, "torch_adam": True}},
        "zero_optimization": zero,
        "comms_logger": {"enabled": True, "prof_all": True, "verbose": False, "debug": False},
        "mat": {"policy": "mat", "warmup_steps": 0, "refresh_interval": 10**6, "probe_samples": N_PROBE,
                **({"modules": ["heads", "mlp", "experts"], "mlp_groups": MLP_GROUPS} if mlp else {})},
    }


def model_parameters(family: str, model: torch.nn.Module):
    # The own Transformer's two named groups are what the trainer passes (DeepSpeed's MoE split needs the names).
    return model.param_groups(WD) if family in ("own", "switch") else model.parameters()


def loss_of(engine, family: str, batch: dict) -> torch.Tensor:
    if family in ("own", "switch"):
        return engine(batch["input_ids"], batch["labels"])
    return engine(**batch).loss


# ----------------------------------------------------------------------------------------------------------------------
# reading state
# ----------------------------------------------------------------------------------------------------------------------
def full_numel(p: torch.nn.Parameter) -> int:
    return int(getattr(p, "ds_numel", p.numel()))  # ZeRO-3: the parameter's size, not the (empty) p.data


def local(p: torch.nn.Parameter) -> torch.Tensor:
    return p.ds_tensor if hasattr(p, "ds_tensor") else p.data


def opt_fragments(engine, stage: int, params) -> dict:
    """(param index, what) -> this rank's fp32 master / exp_avg / exp_avg_sq fragment of each param, read directly from
    DeepSpeed's optimizer (see mat_ds/core/freezing.py for where each stage keeps them)."""
    opt = engine.optimizer
    out = {}
    if stage in (1, 2):
        group_of = {id(q): i for i, g in enumerate(opt.bit16_groups) for q in g}
    for k, p in enumerate(params):
        if stage == 3:
            sub_group, start, numel = (int(v) for v in opt.grad_position[opt.get_param_id(p)])
            flat = opt.fp32_partitioned_groups_flat[sub_group]
            state = opt.optimizer.state[flat]
        elif stage in (1, 2):
            mapping = getattr(p, "_hp_mapping", None)
            if not mapping:
                continue  # this rank's partition holds no part of p
            address = mapping.get_hp_fragment_address()
            start, numel = int(address.start), int(address.numel)
            flat = opt.single_partition_of_fp32_groups[group_of[id(p)]]
            state = opt.optimizer.state[flat]
        else:
            flat, start, numel = p, 0, p.numel()
            state = opt.state[p]
        out[(k, "fp32")] = flat.detach().view(-1)[start:start + numel].clone()
        for name in ("exp_avg", "exp_avg_sq"):
            out[(k, name)] = state[name].view(-1)[start:start + numel].clone()
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def lam_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    la, lb = lambda_max(a), lambda_max(b)
    return float(((la - lb).abs() / lb.abs().clamp_min(1e-30)).max())


def gather(obj):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_max(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


# ----------------------------------------------------------------------------------------------------------------------
# one case
# ----------------------------------------------------------------------------------------------------------------------
class Case:
    def __init__(self, family: str, stage: int, ep: int):
        family, _, extra = family.partition("+")
        self.mlp = extra == "mlp"
        self.family, self.stage, self.ep = family, stage, ep
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        causal = CAUSAL[family]
        self.probe = make_batch(7, N_PROBE, causal)  # same on every rank
        # the fixed training stream: one micro-batch per (rank, micro), repeated every optimizer step
        self.micro = [make_batch(1000 + 10 * self.rank + m, MICRO, causal) for m in range(ACCUM)]

        model = build_model(family, ep)
        self.ref = None
        if stage == 3:  # unpartitioned copy of the CONVERTED model for the oracle (ZeRO-3 shards the engine's)
            mat_ds.convert_model(model, mlp_groups=MLP_GROUPS if self.mlp else None)
            self.ref = copy.deepcopy(model)
        self.engine, *_ = mat_ds.initialize(model=model, model_parameters=model_parameters(family, model),
                                            config=ds_config(stage, self.mlp), probe_batch=self.probe)
        assert self.engine.zero_optimization_stage() == stage
        self.mat = self.engine.mat
        self.units = self.mat.units

    # -- λmax ---------------------------------------------------------------------------------------------------------
    def oracle(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Explicit-Jacobian Grams of the engine's CURRENT weights."""
        if self.ref is None:
            model, units = self.engine.module, self.units
        else:
            params = list(self.engine.module.parameters())
            with deepspeed.zero.GatheredParameters(params):
                with torch.no_grad():
                    named = dict(self.ref.named_parameters())
                    for name, p in self.engine.module.named_parameters():
                        named[name].copy_(p.data)
            model, units = self.ref, find_units(self.ref)
        # The probe's f_i is defined with MoE token dropping off (mat_ds.core.experts.record_routes: each sample's
        # routing depends on that sample alone); the head oracle must see the same function.
        with record_routes(units.moe_layers):
            heads = explicit_head_grams(model, units, self.probe, self.mat.probe_fn)
        experts = explicit_expert_grams(model, units, self.probe, self.mat.probe_fn) if units.experts else None
        mlp = explicit_unit_grams(model, units.mlp, self.probe, self.mat.probe_fn) if units.mlp else None
        return heads, experts, mlp

    def measure(self, experts: bool = True):
        result = probe_units(self.engine.module, self.units, self.probe, self.mat.probe_fn,
                             experts=experts and bool(self.units.experts), mlp=bool(self.units.mlp))
        if self.stage == 3:
            self.engine.empty_partition_cache()
        return result

    def compare(self, result, oracle: tuple, prefix: str, res: dict) -> None:
        heads, experts, mlp = oracle
        if mlp is not None:
            res[f"{prefix}_lam_rel_err_mlp"] = lam_rel(result.mlp_grams, mlp)
            res[f"{prefix}_gram_rel_err_mlp"] = rel(result.mlp_grams, mlp)
        res[f"{prefix}_lam_rel_err_heads"] = lam_rel(result.head_grams, heads)
        res[f"{prefix}_gram_rel_err_heads"] = rel(result.head_grams, heads)
        if experts is not None:
            res[f"{prefix}_lam_rel_err_experts"] = lam_rel(result.expert_grams, experts)
            res[f"{prefix}_gram_rel_err_experts"] = rel(result.expert_grams, experts)

    # -- training -----------------------------------------------------------------------------------------------------
    def train_step(self) -> tuple[float, int]:
        """One optimizer step on the fixed micro-batches: (mean loss over micro-batches and ranks, gradient bytes)."""
        before = comm_bytes_snapshot()
        total = 0.0
        for batch in self.micro:
            loss = loss_of(self.engine, self.family, batch)
            self.engine.backward(loss)
            self.engine.step()
            total += float(loss.detach())
        after = comm_bytes_snapshot()
        grad_bytes = sum(after[k] - before.get(k, 0) for k in after if k in GRADIENT_OPS)
        mean = torch.tensor([total / ACCUM], dtype=torch.float64)
        dist.all_reduce(mean)
        return float(mean) / self.world, grad_bytes

    def set_frozen(self, heads: list[int], experts: list[int], mlp: list[int] = ()) -> torch.Tensor:
        nh, nm, ne = len(self.units.heads), len(self.units.mlp), len(self.units.experts)
        mask = torch.zeros(nh + nm + ne, dtype=torch.bool)  # the freezer's order: heads, MLP units, experts
        mask[heads] = True
        mask[[nh + g for g in mlp]] = True
        mask[[nh + nm + e for e in experts]] = True
        self.mat.freezer.apply(mask)
        self.mat.policies["heads"].frozen = mask[:nh].clone()  # keep the controller's view consistent
        self.mat.policies["mlp"].frozen = mask[nh:nh + nm].clone()
        self.mat.policies["experts"].frozen = mask[nh + nm:].clone()
        return mask

    def expected_drop(self, frozen_params: list) -> int:
        if self.stage == 3:
            W = self.world
            return ACCUM * 4 * sum(math.ceil(int(p.ds_numel) / W) * W for p in frozen_params)
        numel = sum(p.numel() for p in frozen_params)
        return (ACCUM if self.stage == 2 else 1) * 4 * numel

    # -- the whole case -----------------------------------------------------------------------------------------------
    def run(self) -> dict:
        t0 = time.perf_counter()
        timings: dict = {}

        def lap(name: str) -> None:
            timings[name] = round(time.perf_counter() - t0 - sum(timings.values()), 3)

        units = self.units
        res: dict = {"family": self.family, "stage": self.stage, "ep_size": self.ep, "world": self.world,
                     "accum": ACCUM, "n_probe": N_PROBE, "heads": len(units.heads), "experts": len(units.experts),
                     "mlp": len(units.mlp), "mlp_case": self.mlp}
        # 1. λmax at init: the fast path and the engine's own step-0 refresh against the explicit Jacobian
        oracle0 = self.oracle()
        lap("oracle_init")
        self.compare(self.measure(), oracle0, "init", res)
        lap("probe_init")
        res["lam_max_heads_init"] = lambda_max(oracle0[0]).tolist()
        losses = []
        loss, _ = self.train_step()  # step 0: MAT refreshes (measures, its policy may freeze) in the first forward
        losses.append(loss)
        engine_probe = self.mat.last_probe
        res["engine_refresh_at_step0"] = engine_probe is not None
        if engine_probe is not None:
            self.compare(engine_probe, oracle0, "engine_step0", res)
        res["policy_frozen_at_step0"] = [u.name for u in self.mat.frozen_units()]
        lap("step0")

        # 2./3. everything trains: gradient bytes per step
        self.set_frozen([], [])
        full_bytes = []
        for _ in range(PHASE_FULL):
            loss, nbytes = self.train_step()
            losses.append(loss)
            full_bytes.append(nbytes)

        hpl = units.heads_per_layer
        frozen_heads = [1, hpl]  # unit 1 of layer 0, unit 0 of layer 1
        frozen_experts = [1, E + 2] if units.experts else []  # expert 1 of the first MoE layer, 2 of the second
        frozen_mlp = [1, MLP_GROUPS] if units.mlp else []  # group 1 of layer 0, group 0 of layer 1
        self.set_frozen(frozen_heads, frozen_experts, frozen_mlp)
        frozen_units = [units.heads[i] for i in frozen_heads] + [units.mlp[g] for g in frozen_mlp] \
            + [units.experts[e] for e in frozen_experts]
        res["frozen_units"] = [u.name for u in frozen_units]
        assert [u.name for u in self.mat.frozen_units()] == res["frozen_units"]
        frozen_params = [p for u in frozen_units for p in u.params]  # what THIS rank holds of them
        frozen_ids = {id(p) for p in frozen_params}
        res["requires_grad_off"] = all(gather(all(not p.requires_grad for p in frozen_params)))
        trained = [u for u in units.all() if all(u is not f for f in frozen_units)]
        w_frozen = [local(p).detach().clone() for p in frozen_params]
        w_trained = [[local(p).detach().clone() for p in u.params] for u in trained]
        s_frozen = opt_fragments(self.engine, self.stage, frozen_params)
        snap = self.mat.snapshot_frozen()
        frozen_bytes = []
        for _ in range(PHASE_FROZEN):
            loss, nbytes = self.train_step()
            losses.append(loss)
            frozen_bytes.append(nbytes)
        lap("steps_1_5")
        assert all(id(p) in frozen_ids for u in self.mat.frozen_units() for p in u.params)
        # weights (local tensors) and optimizer-state fragments of the frozen units: max |Δ| on each rank
        w_drift = max([float((a - local(p)).abs().max()) for a, p in zip(w_frozen, frozen_params)] or [0.0])
        s_after = opt_fragments(self.engine, self.stage, frozen_params)
        assert s_after.keys() == s_frozen.keys()
        s_drift = {what: max([float((s_frozen[k] - s_after[k]).abs().max()) for k in s_frozen if k[1] == what]
                             or [0.0]) for what in ("fp32", "exp_avg", "exp_avg_sq")}
        # where the optimizer holds them: stage 0 the whole params, stage 3 one padded chunk of each on every rank,
        # stage 1/2 disjoint pieces of the flat partitions (checked by the test: summed over ranks)
        frag_numel = sum(v.numel() for k, v in s_frozen.items() if k[1] == "fp32")
        expected_frag = {0: sum(full_numel(p) for p in frozen_params),
                         3: sum(math.ceil(full_numel(p) / self.world) for p in frozen_params)}.get(self.stage)
        per_rank = gather({"weights": w_drift, **s_drift, "fragments": len(s_frozen) // 3,
                           "fragment_numel": frag_numel, "fragment_numel_expected": expected_frag,
                           "expert_numel": sum(full_numel(p) for u in frozen_units if u.kind == "experts"
                                               for p in u.params)})
        opt = self.engine.optimizer
        res["optimizer_flat_tensors"] = len(opt.fp32_partitioned_groups_flat) if self.stage == 3 else \
            len(opt.single_partition_of_fp32_groups) if self.stage in (1, 2) else len(frozen_params)
        res["frozen_drift_per_rank"] = per_rank
        res["frozen_weight_drift"] = max(r["weights"] for r in per_rank)
        res["frozen_state_drift"] = {w: max(r[w] for r in per_rank) for w in ("fp32", "exp_avg", "exp_avg_sq")}
        res["frozen_change_api"] = self.mat.frozen_change(snap)
        # every frozen element counted once: heads are on every rank, an expert on world/ep_size ranks
        res["frozen_numel_global"] = sum(full_numel(p) for u in frozen_units if u.kind != "experts"
                                         for p in u.params) \
            + sum(r["expert_numel"] for r in per_rank) // (self.world // self.ep)
        # units that train: each moved on the rank(s) holding it
        moved = [max([float((a - local(p)).abs().max()) for a, p in zip(before, u.params)] or [0.0])
                 for before, u in zip(w_trained, trained)]
        moved = all_max(moved)
        res["trained_units"] = len(trained)
        res["trained_min_change"] = min(moved)
        res["trained_unmoved"] = [u.name for u, m in zip(trained, moved) if m <= 0.0]
        # gradient bytes per step, per rank
        res["grad_bytes_per_rank"] = gather({
            "full": full_bytes, "frozen": frozen_bytes, "drop": full_bytes[-1] - frozen_bytes[-1],
            "expected_drop": self.expected_drop(frozen_params),
            "frozen_local_numel": sum(full_numel(p) for p in frozen_params)})

        # 1 (again). λmax after training, with frozen units in the model
        lap("freeze_checks")
        result = self.measure()
        lap("probe_trained")
        oracle1 = self.oracle()
        self.compare(result, oracle1, "trained", res)
        if self.units.experts:  # heads only (mat.modules=["heads"]): the same head Grams, the same routing
            self.compare(self.measure(experts=False), (oracle1[0], None, oracle1[2]), "trained_heads_only", res)
        lap("oracle_trained")

        # 4. MAT's own policy, refreshing every POLICY_INTERVAL steps
        self.mat.cfg.refresh_interval = POLICY_INTERVAL
        refreshes, policy_drift = [], 0.0
        for _ in range(PHASE_POLICY):
            step = int(self.engine.global_steps)
            refreshing = self.mat.is_refresh_step(step)
            snap = None if refreshing else self.mat.snapshot_frozen()
            loss, _ = self.train_step()
            losses.append(loss)
            metrics = self.mat.metrics()
            if refreshing:
                refreshes.append({"step": step, "frozen_heads": metrics.get("mat/frozen_heads"),
                                  "frozen_experts": metrics.get("mat/frozen_experts"),
                                  "frozen_mlp": metrics.get("mat/frozen_mlp")})
            else:
                policy_drift = max(policy_drift, self.mat.frozen_change(snap))
        res["policy_refreshes"] = refreshes
        res["policy_frozen_drift"] = policy_drift
        res["losses"] = losses
        res["loss_first"], res["loss_last"] = losses[0], losses[-1]
        lap("policy_steps")
        res["timings"] = timings
        res["threads"] = torch.get_num_threads()
        res["seconds"] = time.perf_counter() - t0
        return res


def moe_zero3_refusal() -> str | None:
    model = build_model("switch", 1)
    try:
        mat_ds.initialize(model=model, model_parameters=model.param_groups(WD), config=ds_config(3),
                          probe_batch=make_batch(7, N_PROBE, False))
    except mat_ds.ConfigError as exc:
        return str(exc)
    return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default="own:2", help="comma-separated family:stage[:ep_size]")
    parser.add_argument("--local_rank", type=int, default=-1)
    args = parser.parse_args()
    torch.set_num_threads(1)  # 2 ranks share the machine's cores: oversubscribed threads make every collective wait
    mat_ds.init_distributed()
    rank = dist.get_rank()
    refusal_checked = False
    for spec in args.cases.split(","):
        family, stage, *ep = spec.split(":")
        case = Case(family, int(stage), int(ep[0]) if ep else 1)
        res = case.run()
        if family == "switch" and not refusal_checked:
            res["moe_zero3_refused"] = moe_zero3_refusal()
            refusal_checked = True
        del case
        if rank == 0:
            print("FAMILY_CHECK " + json.dumps(res), flush=True)
        dist.barrier()
    mat_ds.shutdown_distributed()


if __name__ == "__main__":
    main()
    exit_process(0)  # no interpreter teardown after the work is done: see mat_ds.distributed.exit_process
