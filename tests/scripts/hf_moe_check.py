"""MAT on a tiny HF Mixtral (fused experts converted per expert by ``mat_ds/adapters/hf_moe.py``, attention by
``hf_llama``), through ``mat_ds.initialize`` on a real DeepSpeed engine, 2 gloo ranks, ZeRO-2, fp32.

    deepspeed --num_gpus 2 tests/scripts/hf_moe_check.py

1. Per-unit Grams / λmax of ``mntk.probe_units(..., experts=True)`` (heads + top-2 experts, one all-reduce) and of the
   engine's own step-0 refresh against explicit per-sample Jacobians (``tests.oracles.explicit_unit_grams``), at init
   and after training with two experts frozen;
2. two experts frozen through ``engine.mat.freezer.apply`` for 3 steps: their weights and fp32 master / exp_avg /
   exp_avg_sq fragments (read straight from the ZeRO-2 optimizer) change by exactly 0 on every rank; every other unit
   moves;
3. gradient bytes per optimizer step (comms logger, ``GRADIENT_OPS``): unfrozen minus frozen = A · 4 · frozen numel;
4. 10 more steps with MAT's own policy refreshing every 4 steps: the loss on the fixed batches falls, and frozen units
   stay exactly frozen between refreshes;
5. the deepspeed.moe path next to it is unchanged: a Switch Transformer (mat_ds's own, 4 top-1 experts per block,
   ep_size 1, ZeRO-2) still gets its expert Grams right (``tests.oracles.explicit_expert_grams``).

Rank 0 prints one ``HF_MOE_CHECK {json}`` line.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.distributed as dist

import mat_ds
from mat_ds.core.freezing import GRADIENT_OPS, comm_bytes_snapshot
from mat_ds.core.mntk import lambda_max, probe_units
from mat_ds.distributed import exit_process
from tests.oracles import explicit_unit_grams
from tests.scripts.family_check import opt_fragments  # fp32 master / Adam fragments per ZeRO stage

V, T, D, F, L, H, KV, E, K = 64, 12, 32, 48, 2, 4, 2, 4, 2
N_PROBE, MICRO, ACCUM, STAGE = 4, 2, 2, 2
LR, WD = 5e-3, 0.01
PHASE_FULL, PHASE_FROZEN, PHASE_POLICY, POLICY_INTERVAL = 2, 3, 10, 4
FROZEN_EXPERTS = (1, E + 2)  # L0E1, L1E2


def build_model() -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)  # identical weights on every rank
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=L, num_attention_heads=H,
        num_key_value_heads=KV, num_local_experts=E, num_experts_per_tok=K, max_position_embeddings=T,
        attention_dropout=0.0))


def make_batch(seed: int, n: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (n, T), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def ds_config() -> dict:
    return {
        "train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": ACCUM, "gradient_clipping": 1.0,
        "steps_per_print": 10**9,
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": WD, "torch_adam": True}},
        "zero_optimization": {"stage": STAGE},
        "comms_logger": {"enabled": True, "prof_all": True, "verbose": False, "debug": False},
        "mat": {"policy": "mat", "warmup_steps": 0, "refresh_interval": 10**6, "probe_samples": N_PROBE},
    }


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def lam_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    la, lb = lambda_max(a), lambda_max(b)
    return float(((la - lb).abs() / lb.abs().clamp_min(1e-30)).max())


def gather(obj):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class Check:
    def __init__(self):
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.probe = make_batch(7, N_PROBE)
        self.micro = [make_batch(1000 + 10 * self.rank + m, MICRO) for m in range(ACCUM)]
        model = build_model()
        self.engine, *_ = mat_ds.initialize(model=model, model_parameters=model.parameters(), config=ds_config(),
                                            probe_batch=self.probe)
        self.mat = self.engine.mat
        self.units = self.mat.units

    def oracle(self) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.engine.module
        return (explicit_unit_grams(model, self.units.heads, self.probe, self.mat.probe_fn),
                explicit_unit_grams(model, self.units.experts, self.probe, self.mat.probe_fn))

    def compare(self, result, oracle, prefix: str, res: dict) -> None:
        heads, experts = oracle
        res[f"{prefix}_lam_rel_err_heads"] = lam_rel(result.head_grams, heads)
        res[f"{prefix}_gram_rel_err_heads"] = rel(result.head_grams, heads)
        res[f"{prefix}_lam_rel_err_experts"] = lam_rel(result.expert_grams, experts)
        res[f"{prefix}_gram_rel_err_experts"] = rel(result.expert_grams, experts)

    def train_step(self) -> tuple[float, int]:
        before = comm_bytes_snapshot()
        total = 0.0
        for batch in self.micro:
            loss = self.engine(**batch).loss
            self.engine.backward(loss)
            self.engine.step()
            total += float(loss.detach())
        after = comm_bytes_snapshot()
        grad_bytes = sum(after[k] - before.get(k, 0) for k in after if k in GRADIENT_OPS)
        mean = torch.tensor([total / ACCUM], dtype=torch.float64)
        dist.all_reduce(mean)
        return float(mean) / self.world, grad_bytes

    def set_frozen(self, experts: list[int]) -> None:
        nh, ne = len(self.units.heads), len(self.units.experts)
        mask = torch.zeros(nh + ne, dtype=torch.bool)
        mask[[nh + e for e in experts]] = True
        self.mat.freezer.apply(mask)
        self.mat.policies["heads"].frozen = mask[:nh].clone()
        self.mat.policies["experts"].frozen = mask[nh:].clone()

    def run(self) -> dict:
        t0 = time.perf_counter()
        units = self.units
        res: dict = {"world": self.world, "stage": STAGE, "accum": ACCUM, "n_probe": N_PROBE, "top_k": K,
                     "heads": [u.name for u in units.heads], "experts": [u.name for u in units.experts],
                     "expert_types": sorted({type(m).__name__ for m in units.fused_expert_layers})}
        oracle0 = self.oracle()
        result = probe_units(self.engine.module, units, self.probe, self.mat.probe_fn, experts=True)
        self.compare(result, oracle0, "init", res)
        res["gram_allreduce_bytes"] = result.gram_allreduce_bytes
        res["lam_experts_init"] = lambda_max(oracle0[1]).tolist()
        losses = []
        loss, _ = self.train_step()  # step 0: the engine's own refresh (heads + experts)
        losses.append(loss)
        res["engine_refresh_at_step0"] = self.mat.last_probe is not None
        if self.mat.last_probe is not None:
            self.compare(self.mat.last_probe, oracle0, "engine_step0", res)
        metrics = self.mat.metrics()
        res["expert_metric_keys"] = sorted(k for k in metrics if k.startswith("mat/expert_lambda_max/"))

        self.set_frozen([])
        full_bytes = []
        for _ in range(PHASE_FULL):
            loss, nbytes = self.train_step()
            losses.append(loss)
            full_bytes.append(nbytes)

        self.set_frozen(list(FROZEN_EXPERTS))
        frozen_units = [units.experts[e] for e in FROZEN_EXPERTS]
        res["frozen_units"] = [u.name for u in frozen_units]
        res["frozen_units_api"] = [u.name for u in self.mat.frozen_units()]
        frozen_params = [p for u in frozen_units for p in u.params]
        res["requires_grad_off"] = all(gather(all(not p.requires_grad for p in frozen_params)))
        trained = [u for u in units.all() if all(u is not f for f in frozen_units)]
        w_frozen = [p.data.clone() for p in frozen_params]
        w_trained = [[p.data.clone() for p in u.params] for u in trained]
        s_frozen = opt_fragments(self.engine, self.engine.zero_optimization_stage(), frozen_params)
        snap = self.mat.snapshot_frozen()
        frozen_bytes = []
        for _ in range(PHASE_FROZEN):
            loss, nbytes = self.train_step()
            losses.append(loss)
            frozen_bytes.append(nbytes)
        w_drift = max(float((a - p.data).abs().max()) for a, p in zip(w_frozen, frozen_params))
        s_after = opt_fragments(self.engine, self.engine.zero_optimization_stage(), frozen_params)
        s_drift = {what: max([float((s_frozen[k] - s_after[k]).abs().max()) for k in s_frozen if k[1] == what]
                             or [0.0]) for what in ("fp32", "exp_avg", "exp_avg_sq")}
        per_rank = gather({"weights": w_drift, **s_drift, "fragments": len(s_frozen) // 3,
                           "fragment_numel": sum(v.numel() for k, v in s_frozen.items() if k[1] == "fp32")})
        res["frozen_drift_per_rank"] = per_rank
        res["frozen_weight_drift"] = max(r["weights"] for r in per_rank)
        res["frozen_state_drift"] = {w: max(r[w] for r in per_rank) for w in ("fp32", "exp_avg", "exp_avg_sq")}
        res["frozen_change_api"] = self.mat.frozen_change(snap)
        moved = [max(float((a - p.data).abs().max()) for a, p in zip(before, u.params))
                 for before, u in zip(w_trained, trained)]
        res["trained_unmoved"] = [u.name for u, m in zip(trained, moved) if m <= 0.0]
        numel = sum(p.numel() for p in frozen_params)
        res["frozen_numel"] = numel
        res["grad_bytes_per_rank"] = gather({"full": full_bytes, "frozen": frozen_bytes,
                                             "drop": full_bytes[-1] - frozen_bytes[-1],
                                             "expected_drop": ACCUM * 4 * numel})

        self.compare(probe_units(self.engine.module, units, self.probe, self.mat.probe_fn, experts=True),
                     self.oracle(), "trained", res)

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
                                  "frozen_experts": metrics.get("mat/frozen_experts")})
            else:
                policy_drift = max(policy_drift, self.mat.frozen_change(snap))
        res["policy_refreshes"] = refreshes
        res["policy_frozen_drift"] = policy_drift
        res["losses"] = losses
        res["seconds"] = time.perf_counter() - t0
        return res


def switch_check() -> dict:
    """deepspeed.moe experts (top-1, capacity buffers) through the same probe_units: Gram vs explicit Jacobian."""
    from mat_ds.config import ModelConfig
    from mat_ds.models.transformer import Transformer
    from tests.oracles import explicit_expert_grams

    torch.manual_seed(0)
    model = Transformer(ModelConfig(arch="bert", n_layer=L, n_head=H, d_model=D, dropout=0.0, moe_num_experts=E,
                                    moe_ep_size=1, moe_layer_interval=1), V, T)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, V, (N_PROBE, T), generator=g)
    target = torch.rand(N_PROBE, T, generator=g) < 0.25
    target[:, 1] = True
    probe = {"input_ids": ids, "labels": torch.where(target, ids, torch.full_like(ids, -100))}
    engine, *_ = mat_ds.initialize(model=model, model_parameters=model.param_groups(WD), config=ds_config(),
                                   probe_batch=probe)
    units = engine.mat.units
    result = probe_units(engine.module, units, probe, engine.mat.probe_fn, experts=True)
    oracle = explicit_expert_grams(engine.module, units, probe, engine.mat.probe_fn)
    return {"switch_experts": len(units.experts), "switch_fused_layers": len(units.fused_expert_layers),
            "switch_gram_rel_err_experts": rel(result.expert_grams, oracle),
            "switch_lam_rel_err_experts": lam_rel(result.expert_grams, oracle)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int, default=-1)
    parser.parse_args()
    torch.set_num_threads(1)  # 2 ranks share the machine's cores
    mat_ds.init_distributed()
    res = Check().run()
    res.update(switch_check())
    if dist.get_rank() == 0:
        print("HF_MOE_CHECK " + json.dumps(res), flush=True)
    dist.barrier()
    mat_ds.shutdown_distributed()


if __name__ == "__main__":
    main()
    exit_process(0)  # no interpreter teardown after the work is done: see mat_ds.distributed.exit_process
