"""The training loop: DeepSpeed engine + MAT head selection, readable top to bottom.

Launch (2 ranks; on a CPU-only machine DeepSpeed picks the CPU accelerator and gloo by itself):

    deepspeed --num_gpus 2 launch/pretrain.py --deepspeed_config configs/bert_mat_zero2.json

One optimizer step:
1. on a refresh step (every ``mat.refresh_interval``): measure per-head (and, for a Switch MoE model, per-expert) λmax
   on the probe batch (``mntk``), let the policy decide the frozen set of each module kind on identical inputs
   everywhere, broadcast rank 0's decision, apply it (``freezing``);
2. ``gradient_accumulation_steps`` micro-batches of forward/backward through the engine; frozen heads compute no weight
   gradient, are left out of the gradient reduction, and the optimizer guard keeps their weights and Adam state exact;
3. account FLOPs (``flops``), log (``tracking``), evaluate, checkpoint (``checkpoint``).

Determinism: batch contents, MLM masks and dropout are functions of (seed, step, global micro-batch index), so a run
with 2 ranks × 1 micro-batch sees exactly what 1 rank × 2 accumulated micro-batches sees, and a resumed run continues
the uninterrupted run's trajectory.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import checkpoint
from .config import DataConfig, MATConfig, ModelConfig, RunConfig, as_dict
from .data import DataBundle, global_positions, iter_eval_batches, make_batch, prepare_data
from .engine import build_engine, init_distributed, zero_stage
from .flops import FlopsModel
from .freezing import GRADIENT_OPS, MOE_DISPATCH_OP, FreezeController, comm_bytes_snapshot
from .mntk import probe_modules
from .model import Transformer
from .policy import Policy, make_policy
from .tracking import Tracker


@dataclass
class Progress:
    """What a checkpoint must carry besides weights/optimizer/policy (cumulative counters)."""

    step: int = 0
    flops: float = 0.0  # training FLOPs (all ranks) + mNTK probe FLOPs
    probe_flops: float = 0.0
    tokens: int = 0
    train_seconds: float = 0.0  # wall-clock in the training loop (including refreshes)
    refresh_seconds: float = 0.0  # wall-clock spent in mNTK refreshes + policy decisions


def _seed_step(seed: int, step: int, micro_index: int) -> None:
    """Dropout randomness as a function of (seed, step, global micro-batch index): layout- and resume-invariant."""
    torch.manual_seed((seed * 1_000_003 + step * 1_009 + micro_index) % (2**63 - 1))


def _allreduce_mean(value: torch.Tensor, world: int) -> torch.Tensor:
    # torch.distributed directly (not deepspeed.comm) so the comms logger counts gradient traffic only.
    if world > 1:
        dist.all_reduce(value)
        value = value / world
    return value


def probe_batch(data: DataBundle, mat: MATConfig, objective: str, mlm_probability: float) -> dict:
    """The fixed probe set: ``probe_samples`` training blocks chosen by ``mat.seed`` with a fixed MLM mask."""
    n = min(mat.probe_samples, data.train.shape[0])
    gen = torch.Generator().manual_seed(mat.seed)
    positions = torch.randperm(data.train.shape[0], generator=gen)[:n]
    return make_batch(data.train, positions, objective=objective, tokenizer=data.tokenizer,
                      mlm_probability=mlm_probability, seed=mat.seed + 7, shuffle=False)


class Trainer:
    def __init__(self, model_cfg: ModelConfig, data_cfg: DataConfig, run_cfg: RunConfig, ds_config: dict,
                 verify_frozen: bool = False):
        self.model_cfg, self.data_cfg, self.run_cfg = model_cfg, data_cfg, run_cfg
        self.mat = MATConfig.from_dict(ds_config.get("mat"))
        self.mat.check_model(model_cfg.n_layer)
        init_distributed()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.is_main = self.rank == 0
        self.objective = "mlm" if model_cfg.arch == "bert" else "clm"

        self.data = prepare_data(data_cfg, is_main=self.is_main, barrier=dist.barrier)
        torch.manual_seed(run_cfg.seed)  # identical initial weights on every rank
        self.model = Transformer(model_cfg, self.data.tokenizer.vocab_size, data_cfg.seq_len)
        self.engine = build_engine(self.model, ds_config, run_cfg.train_steps, comm_stats=run_cfg.comm_stats)
        self.micro = self.engine.train_micro_batch_size_per_gpu()
        self.accum = self.engine.gradient_accumulation_steps()
        self.tokens_per_step = self.micro * self.accum * self.world * data_cfg.seq_len

        # Modules the freezer controls: every head, every layer's non-head parameters (frozen when RaPTr skips it),
        # then every expert of every Switch layer (global ids; [] on ranks that do not hold the expert).
        self.moe_layers = model_cfg.moe_layers
        self.n_experts = self.model.n_experts_total
        self.freezer = FreezeController(self.engine, self.model.head_modules() + self.model.layer_bodies()
                                        + self.model.expert_modules())
        # One policy per module kind: λmax scales differ between heads and experts, so each kind has its own threshold.
        self.policy = make_policy(self.mat, self.model.n_heads_total, model_cfg.n_layer) \
            if "heads" in self.mat.modules else Policy(self.mat, self.model.n_heads_total, model_cfg.n_layer)
        self.expert_policy = make_policy(self.mat, self.n_experts, len(self.moe_layers)) \
            if self.n_experts and "experts" in self.mat.modules else Policy(self.mat, self.n_experts, 1)
        if self.expert_policy.name == "raptr":  # RaPTr picks layers; experts follow their layer's path
            self.expert_policy = Policy(self.mat, self.n_experts, 1)
        self.tokens_routed = torch.zeros(self.n_experts, dtype=torch.float64)  # this step, all ranks
        self.skipped = torch.zeros(model_cfg.n_layer, dtype=torch.bool)
        self.flops = FlopsModel.for_run(model_cfg, self.data.tokenizer.vocab_size, data_cfg.seq_len,
                                         data_cfg.mlm_probability)
        self.probe = probe_batch(self.data, self.mat, self.objective, data_cfg.mlm_probability) \
            if self.mat.needs_probe else None
        self.verify_frozen = verify_frozen
        self.pending_heatmap: tuple | None = None  # (step, λmax, frozen) to draw outside the timed step
        self.progress = Progress()

        state = checkpoint.load(self.engine, run_cfg.save_dir, run_cfg.resume)
        if state is not None:
            self.progress = Progress(**state["progress"])
            self.policy.load_state_dict(state["policy"])
            if "expert_policy" in state:
                self.expert_policy.load_state_dict(state["expert_policy"])
            self._apply(self.policy.frozen, self.policy.skipped_layers(self.progress.step))
        self.config_dict = {**as_dict(model_cfg, data_cfg, run_cfg, self.mat), "deepspeed": ds_config,
                            "world_size": self.world, "zero_stage": zero_stage(self.engine),
                            "n_params": sum(p.numel() for p in self.model.parameters()) if zero_stage(self.engine) < 3
                            else sum(getattr(p, "ds_numel", p.numel()) for p in self.model.parameters())}
        self.tracker = Tracker(run_cfg.out_dir, run_cfg.run_name, run_cfg.wandb_project, run_cfg.wandb_mode,
                               self.config_dict, enabled=self.is_main,
                               resume_step=self.progress.step if state is not None else None)

    # -- one refresh of the module selection -----------------------------------------------------------------------
    def is_refresh_step(self, step: int) -> bool:
        return self.policy.is_refresh_step(step) or (self.n_experts > 0 and self.expert_policy.is_refresh_step(step))

    def refresh(self, step: int) -> dict:
        t0 = time.perf_counter()
        lam = lam_e = None
        probe_metrics: dict = {}
        if self.probe is not None:
            n = self.probe["input_ids"].shape[0]
            # One probe pass for heads and experts. ZeRO-3: each rank's partial head Gram over the parameter shard it
            # owns; ONE n×n-per-module all-reduce completes heads and experts.
            probe = probe_modules(self.engine.module, self.probe, self.mat.probe_output, self.mat.seed,
                                  experts=self.n_experts > 0 and "experts" in self.mat.modules)
            if zero_stage(self.engine) == 3:
                self.engine.empty_partition_cache()  # the probe's backward stops early: release what it gathered
            lam = probe.lambda_max() if "heads" in self.mat.modules else None
            lam_e = probe.expert_lambda_max() if probe.expert_grams is not None else None
            probe_metrics = probe.metrics()
            self.progress.probe_flops += self.flops.probe_total(n, self.world)
        decision = torch.cat([self.policy.update(step, lam), self.policy.skipped_layers(step),
                              self.expert_policy.update(step, lam_e)]).to(torch.uint8)
        if self.world > 1:  # rank 0 decides for everyone (identical inputs, but never risk a collective mismatch)
            dist.broadcast(decision, src=0)
        M, L = self.policy.n_modules, self.model_cfg.n_layer
        self.policy.frozen = decision[:M].bool()
        self.expert_policy.frozen = decision[M + L:].bool()
        self._apply(self.policy.frozen, decision[M:M + L].bool())
        seconds = time.perf_counter() - t0  # MAT's overhead: probe + policy + applying it (not the logging below)
        self.progress.refresh_seconds += seconds
        metrics = {"mat/refresh_seconds": seconds, "mat/frozen_heads": int(self.policy.frozen.sum()), **probe_metrics}
        if self.n_experts:
            E = self.model_cfg.moe_num_experts
            metrics["mat/frozen_experts"] = int(self.expert_policy.frozen.sum())
            if lam_e is not None:
                metrics.update({f"mat/expert_lambda_max/L{self.moe_layers[i // E]}E{i % E}": v
                                for i, v in enumerate(lam_e.flatten().tolist())})
        if lam is not None:
            H = self.model_cfg.n_head
            metrics.update({f"mat/lambda_max/L{i // H}H{i % H}": v for i, v in enumerate(lam.flatten().tolist())})
            metrics["mat/lambda_max_mean"] = float(lam.mean())
            every = self.mat.log_heatmap_interval
            if every and step % every == 0:  # drawn after the step is timed (see train())
                self.pending_heatmap = (step, lam, self.policy.frozen.view_as(lam))
        return metrics

    def _apply(self, frozen_heads: torch.Tensor, skipped: torch.Tensor) -> None:
        """Freeze heads, experts and skipped layers (whole layer: its heads, body and experts); set the layer path."""
        self.skipped = skipped
        H = self.model_cfg.n_head
        heads = frozen_heads | skipped.repeat_interleave(H)
        experts = self.frozen_experts()
        self.freezer.apply(torch.cat([heads, skipped, experts]))
        self.model.active_layers = (~skipped).tolist()

    def frozen_experts(self) -> torch.Tensor:
        """Experts not trained this step: frozen by the policy, or in a layer RaPTr skips."""
        if not self.n_experts:
            return torch.zeros(0, dtype=torch.bool)
        in_skipped = self.skipped[self.moe_layers].repeat_interleave(self.model_cfg.moe_num_experts)
        return self.expert_policy.frozen | in_skipped

    def _frozen_heads_in_active_layers(self) -> int:
        H = self.model_cfg.n_head
        return int((self.policy.frozen & ~self.skipped.repeat_interleave(H)).sum())

    # -- evaluation -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, blocks: torch.Tensor, max_batches: int) -> float:
        """Token-weighted mean loss over deterministic batches (``data.iter_eval_batches``: same count on every rank)."""
        total = torch.zeros(2, dtype=torch.float64)
        path = self.model.active_layers
        self.model.active_layers = [True] * self.model_cfg.n_layer  # always evaluate the whole model
        self.engine.eval()
        for batch in iter_eval_batches(blocks, self.micro, self.rank, self.world, max_batches, self.objective,
                                       self.data.tokenizer, self.data_cfg.mlm_probability, self.run_cfg.seed + 99):
            loss = self.engine(batch["input_ids"], batch["labels"])
            n_tok = int((self.model.token_targets(batch["labels"]) != -100).sum())
            total += torch.tensor([float(loss) * n_tok, n_tok], dtype=torch.float64)
        self.engine.train()
        self.model.active_layers = path
        if self.world > 1:
            dist.all_reduce(total)
        return float(total[0] / total[1].clamp_min(1))

    # -- the loop ---------------------------------------------------------------------------------------------------
    def train(self) -> dict:
        run, p = self.run_cfg, self.progress
        if p.step >= run.train_steps and self.is_main:
            print(f"[mat_ds] checkpoint is already at step {p.step} >= train_steps={run.train_steps}; nothing to do")
        last_val = float("nan")
        while p.step < run.train_steps and not self._budget_spent():
            step = p.step
            t0 = time.perf_counter()
            metrics: dict = {}
            if self.is_refresh_step(step):
                metrics.update(self.refresh(step))
            watch = self._snapshot_frozen() if self.verify_frozen else None
            comm_before = comm_bytes_snapshot() if run.comm_stats else None

            loss_sum = torch.zeros((), dtype=torch.float64)
            aux_sum = torch.zeros((), dtype=torch.float64)
            self.tokens_routed.zero_()
            for micro_step in range(self.accum):
                positions = global_positions(step, micro_step, self.rank, self.world, self.micro, self.accum)
                batch = make_batch(self.data.train, positions, objective=self.objective, tokenizer=self.data.tokenizer,
                                   mlm_probability=self.data_cfg.mlm_probability, seed=run.seed)
                _seed_step(run.seed, step, micro_step * self.world + self.rank)
                loss = self.engine(batch["input_ids"], batch["labels"])
                self.engine.backward(loss)
                self.engine.step()
                loss_sum += self.model.last_lm_loss.double()  # the LM loss; the MoE balancing term is logged apart
                if self.n_experts:
                    aux_sum += float(self.model.aux_loss())
                    self.tokens_routed += torch.cat([layer.exp_counts.double().flatten()
                                                     for layer in self.model.switch_layers()])
            train_loss = float(_allreduce_mean(loss_sum / self.accum, self.world))
            if self.n_experts:  # one small all-reduce: [aux, tokens per expert]
                routed = _allreduce_mean(torch.cat([aux_sum.reshape(1) / self.accum, self.tokens_routed]), self.world)
                aux_loss, self.tokens_routed = float(routed[0]), routed[1:] * self.world

            seconds = time.perf_counter() - t0
            n_skipped = int(self.skipped.sum())
            n_inactive = int((self.policy.frozen | self.skipped.repeat_interleave(self.model_cfg.n_head)).sum())
            p.step += 1
            p.tokens += self.tokens_per_step
            frozen_expert_tokens = int(self.tokens_routed[self.frozen_experts()].sum()) if self.n_experts else 0
            p.flops += self.flops.train_step(self.tokens_per_step, self._frozen_heads_in_active_layers(), n_skipped,
                                             frozen_expert_tokens)
            p.train_seconds += seconds
            metrics.update({
                "train/loss": train_loss,
                "train/lr": self.engine.get_lr()[0],
                "train/tokens": p.tokens,
                "perf/step_seconds": seconds,
                "perf/tokens_per_second": self.tokens_per_step / seconds,
                "perf/flops_cumulative": p.flops + p.probe_flops,
                "perf/train_flops_cumulative": p.flops,
                "perf/train_seconds_cumulative": p.train_seconds,
                "mat/active_fraction": 1.0 - n_inactive / self.policy.n_modules,
                "mat/skipped_layers": n_skipped,
                "mat/frozen_params": self.freezer.frozen_numel(),
                "mat/refresh_share": p.refresh_seconds / max(p.train_seconds, 1e-9),
            })
            if self.n_experts:
                E = self.model_cfg.moe_num_experts
                frozen_e = self.frozen_experts()
                metrics.update({"train/aux_loss": aux_loss, "mat/active_experts": int((~frozen_e).sum()),
                                "mat/active_expert_fraction": float((~frozen_e).float().mean())})
                metrics.update({f"moe/tokens/L{self.moe_layers[i // E]}E{i % E}": int(v)
                                for i, v in enumerate(self.tokens_routed.tolist())})
            if comm_before is not None:
                after = comm_bytes_snapshot()
                delta = {op: after[op] - comm_before.get(op, 0) for op in after}
                metrics["perf/grad_comm_bytes"] = sum(v for op, v in delta.items() if op in GRADIENT_OPS)
                if self.n_experts:
                    metrics["perf/moe_dispatch_bytes"] = delta.get(MOE_DISPATCH_OP, 0)  # token all-to-all (ep > 1)
                metrics["perf/comm_bytes"] = sum(delta.values())
            if watch is not None:
                metrics["mat/frozen_max_abs_change"] = self._frozen_change(watch)
            if not math.isfinite(train_loss):
                raise FloatingPointError(f"train loss is {train_loss} at step {step}")

            last_step = p.step == run.train_steps or self._budget_spent()
            if (run.eval_interval and p.step % run.eval_interval == 0) or last_step:
                last_val = self.evaluate(self.data.val, run.eval_batches)
                metrics.update({"val/loss": last_val, "val/ppl": math.exp(min(last_val, 50))})
                if self.data.test is not None:
                    metrics["test/loss"] = self.evaluate(self.data.test, run.eval_batches)
            self.tracker.log(p.step, metrics)
            if self.pending_heatmap is not None:
                self.tracker.log_heads(*self.pending_heatmap)
                self.pending_heatmap = None
            if self.is_main and (p.step % run.log_interval == 0 or p.step == run.train_steps):
                print(f"[mat_ds] step {p.step:5d} loss {train_loss:.4f} active {metrics['mat/active_fraction']:.2f} "
                      f"{metrics['perf/tokens_per_second']:.0f} tok/s"
                      + (f" val {last_val:.4f}" if "val/loss" in metrics else ""), flush=True)
            if (run.save_interval and p.step % run.save_interval == 0) or last_step:
                checkpoint.save(self.engine, run.save_dir, p.step,
                                {"progress": vars(p).copy(), "policy": self.policy.state_dict(),
                                 "expert_policy": self.expert_policy.state_dict(), "config": self.config_dict})

        summary = {"step": p.step, "val/loss": last_val, "perf/flops_cumulative": p.flops + p.probe_flops,
                   "mat/refresh_share": p.refresh_seconds / max(p.train_seconds, 1e-9)}
        if self.data.test is not None:
            test = self.evaluate(self.data.test, 0)
            summary.update({"test/loss_final": test, "test/ppl_final": math.exp(min(test, 50))})
            self.tracker.log(p.step, {k: v for k, v in summary.items() if k.startswith("test/")})
        if self.is_main:
            print("[mat_ds] done " + " ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}"
                                              for k, v in summary.items()), flush=True)
        self.tracker.finish()
        return summary

    def _budget_spent(self) -> bool:
        budget = self.run_cfg.flops_budget
        return bool(budget) and self.progress.flops + self.progress.probe_flops >= budget

    # -- verification of "frozen means frozen" (opt-in: it copies the frozen heads every step) -----------------------
    def _local(self, param: torch.nn.Parameter) -> torch.Tensor:
        return param.ds_tensor if hasattr(param, "ds_tensor") else param.data  # ZeRO-3: this rank's shard

    def _watched(self) -> dict:
        """Frozen modules to watch: ("head", i) and ("expert", i) -> their parameters on this rank."""
        heads, experts = self.model.head_modules(), self.model.expert_modules()
        out = {("head", i): heads[i] for i in self.policy.frozen.nonzero().flatten().tolist()}
        out.update({("expert", i): experts[i] for i in self.frozen_experts().nonzero().flatten().tolist()})
        return out

    def _snapshot_frozen(self) -> dict:
        return {key: [self._local(q).clone() for q in params] for key, params in self._watched().items()}

    def _frozen_change(self, snapshot: dict) -> float:
        watched = self._watched()
        worst = torch.zeros((), dtype=torch.float64)
        for key, before in snapshot.items():
            for b, q in zip(before, watched.get(key, [])):
                worst = torch.maximum(worst, (self._local(q) - b).abs().max().double())
        if self.world > 1:
            dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        return float(worst)
