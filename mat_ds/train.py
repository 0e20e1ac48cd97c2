"""The project's own pretraining loop: a client of ``mat_ds.initialize`` like any user's loop.

Launch (2 ranks; on a CPU-only machine DeepSpeed picks the CPU accelerator and gloo by itself):

    deepspeed --num_gpus 2 --module mat_ds.pretrain --deepspeed_config configs/bert_mat_zero2.json

One optimizer step: ``gradient_accumulation_steps`` micro-batches of forward/backward/step through the engine. MAT
runs inside the engine (``mat_ds/core/engine.py``): at the first forward of a refresh step it measures λmax on the
probe set, decides and freezes; frozen heads compute no weight gradient, leave the gradient reduction, and keep their
weights and Adam state exactly. This loop then accounts FLOPs (``models/flops.py``), logs (``tracking``; MAT's own
metrics come from ``engine.mat.metrics()``), evaluates and checkpoints (``checkpoint``; MAT's state rides in the
engine's checkpoint).

Determinism: batch contents, MLM masks and dropout are functions of (seed, step, global micro-batch index), so a run
with 2 ranks × 1 micro-batch sees exactly what 1 rank × 2 accumulated micro-batches sees, and a resumed run continues
the uninterrupted run's trajectory.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from . import checkpoint
from .config import ConfigError, DataConfig, MATConfig, ModelConfig, RunConfig, as_dict
from .core.engine import comm_device
from .core.freezing import GRADIENT_OPS, MOE_DISPATCH_OP, comm_bytes_snapshot
from .core.topology import Topology
from .data import DataBundle, global_positions, iter_eval_batches, make_batch, prepare_data
from .distributed import init_distributed
from .models.flops import FlopsModel
from .models.hf import flops_config, load_hf_model, targets_of
from .models.switch import switch_layers
from .models.transformer import Transformer
from .tracking import Tracker
from .wrapper import initialize

COMMS_LOGGER = {"enabled": True, "prof_all": True, "verbose": False, "debug": False}


@dataclass
class Progress:
    """What a checkpoint must carry besides weights/optimizer/MAT state (cumulative counters)."""

    step: int = 0
    flops: float = 0.0  # training FLOPs (all ranks) + mNTK probe FLOPs
    probe_flops: float = 0.0
    tokens: int = 0
    train_seconds: float = 0.0  # wall-clock in the training loop (including refreshes)
    refresh_seconds: float = 0.0  # wall-clock spent in mNTK refreshes + policy decisions
    best_eval: float = float("inf")  # lowest monitored evaluation loss so far (RunConfig.patience)
    evals_since_best: int = 0  # evaluations since that best
    patience_from: int = 0  # the RunConfig.patience_from that best_eval / evals_since_best were counted under
    best_step: int = 0  # the step of best_eval (0 = none yet): retention keeps that checkpoint when one was saved


def _seed_step(seed: int, step: int, micro_index: int) -> None:
    """Dropout randomness as a function of (seed, step, global micro-batch index): layout- and resume-invariant."""
    torch.manual_seed((seed * 1_000_003 + step * 1_009 + micro_index) % (2**63 - 1))


def _allreduce_mean(value: torch.Tensor, world: int) -> torch.Tensor:
    # torch.distributed directly (not deepspeed.comm) so the comms logger counts gradient traffic only.
    if world > 1:
        value = value.to(comm_device())  # NCCL reduces accelerator tensors only
        dist.all_reduce(value)
        value = value.cpu() / world
    return value


def probe_batch(data: DataBundle, mat: MATConfig, objective: str, mlm_probability: float) -> dict:
    """The fixed probe set: ``probe_samples`` training blocks chosen by ``mat.seed`` with a fixed MLM mask."""
    n = mat.probe_samples
    if n > data.train.shape[0]:
        raise ConfigError(f"mat.probe_samples={n} exceeds the {data.train.shape[0]} training blocks: lower it")
    gen = torch.Generator().manual_seed(mat.seed)
    positions = torch.randperm(data.train.shape[0], generator=gen)[:n]
    return make_batch(data.train, positions, objective=objective, tokenizer=data.tokenizer,
                      mlm_probability=mlm_probability, seed=mat.seed + 7, shuffle=False)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """nanoGPT's rule for any model: matrices (incl. embeddings) decay; biases and norm gains do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay, "name": "decay"},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "name": "no_decay"}]


def deepspeed_config(ds_config: dict, train_steps: int, comm_stats: bool) -> dict:
    """The JSON as DeepSpeed gets it: ``"total_num_steps": "auto"`` = ``--train_steps``; the comms logger on with
    ``--comm_stats``; the project's own ``"model"`` block removed (it is read by ``config.from_cli``)."""
    cfg = copy.deepcopy(ds_config)
    cfg.pop("model", None)
    sched = cfg.get("scheduler", {}).get("params", {})
    if sched.get("total_num_steps") == "auto":
        sched["total_num_steps"] = train_steps
    if "optimizer" not in cfg:
        raise ConfigError('the DeepSpeed config needs an "optimizer" block, e.g. {"type": "AdamW", "params": '
                          '{"lr": 5e-4, "weight_decay": 0.01, "torch_adam": true}}')
    if comm_stats:
        cfg.setdefault("comms_logger", dict(COMMS_LOGGER))
    return cfg


class Trainer:
    def __init__(self, model_cfg: ModelConfig, data_cfg: DataConfig, run_cfg: RunConfig, ds_config: dict,
                 verify_frozen: bool = False, mat_cfg: Optional[MATConfig] = None):
        self.model_cfg, self.data_cfg, self.run_cfg = model_cfg, data_cfg, run_cfg
        # the "mat" block: as the entry point parsed it (handed on, not parsed again), else parsed here
        self.mat_cfg = mat_cfg if mat_cfg is not None else MATConfig.from_dict(ds_config.get("mat"))
        self.mat_cfg.check_model(model_cfg.n_layer)
        # One live run per out_dir: rank 0 takes the lock before the process group exists, every rank learns its
        # decision (checkpoint.lock_out_dir); released by close(), or by the kernel when the process dies.
        self.run_lock = checkpoint.lock_out_dir(run_cfg.out_dir, init_distributed)
        try:
            self._setup(ds_config, verify_frozen)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the out_dir lock (rank 0). Called by the entry point after train(), and on a failed start."""
        if getattr(self, "run_lock", None) is not None:
            self.run_lock.release()
            self.run_lock = None

    def _setup(self, ds_config: dict, verify_frozen: bool) -> None:
        model_cfg, data_cfg, run_cfg = self.model_cfg, self.data_cfg, self.run_cfg
        whole = Topology.current()  # before the engine: the whole-world view (rank 0 does the file work)
        self.rank, self.world = whole.rank, whole.world
        self.is_main = self.rank == 0
        self.data = prepare_data(data_cfg, is_main=self.is_main, barrier=dist.barrier)
        torch.manual_seed(run_cfg.seed)  # identical initial weights on every rank
        self.hf = model_cfg.model.startswith("hf:")
        if self.hf:  # a Hugging Face model from disk; mat_ds.initialize converts its attention
            self.model, self.objective = load_hf_model(model_cfg.model, self.data.tokenizer.vocab_size, data_cfg.seq_len)
            flops_cfg = flops_config(self.model)
        else:
            self.objective = "mlm" if model_cfg.arch == "bert" else "clm"
            self.model = Transformer(model_cfg, self.data.tokenizer.vocab_size, data_cfg.seq_len)
            flops_cfg = model_cfg
        ds = deepspeed_config(ds_config, run_cfg.train_steps, run_cfg.comm_stats)
        if model_cfg.moe_num_experts and int(ds.get("zero_optimization", {}).get("stage", 0)) == 3:
            raise ConfigError("moe_num_experts > 0 uses DeepSpeed's native MoE layer, which DeepSpeed does not support "
                              "under ZeRO stage 3: use zero_optimization.stage 2 (or 0/1) for MoE runs, or a dense "
                              "model (moe_num_experts 0) for ZeRO-3")
        weight_decay = float(ds["optimizer"].get("params", {}).get("weight_decay", 0.0))
        probe = probe_batch(self.data, self.mat_cfg, self.objective, data_cfg.mlm_probability) \
            if self.mat_cfg.needs_probe else None
        try:
            groups = param_groups(self.model, weight_decay) if self.hf else self.model.param_groups(weight_decay)
            self.engine, _, _, _ = initialize(model=self.model, model_parameters=groups, config=ds, probe_batch=probe,
                                              mat_config=self.mat_cfg)  # the "mat" block, parsed once
        except (ValueError, KeyError, TypeError, AssertionError) as exc:
            if isinstance(exc, ConfigError):
                raise
            # DeepSpeed reports config problems as multi-line pydantic/assert messages; keep the first line.
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"DeepSpeed rejected the config: {first}") from None
        self.mat = getattr(self.engine, "mat", None)  # None: no "mat" block, plain DeepSpeed
        # Data is sharded over the data-parallel replicas, not the world: the tensor-parallel ranks of a replica must
        # see the same batches (DeepSpeed AutoTP checks it at the first forward). Without TP, dp == world.
        self.topology = self.mat.topology if self.mat is not None else Topology.from_engine(self.engine)
        self.dp_rank, self.dp_size = self.topology.dp_rank, self.topology.dp_size
        self.micro = self.engine.train_micro_batch_size_per_gpu()
        self.accum = self.engine.gradient_accumulation_steps()
        self.tokens_per_step = self.micro * self.accum * self.dp_size * data_cfg.seq_len
        self.switch = switch_layers(self.model)
        self.n_experts = len(self.switch) * model_cfg.moe_num_experts
        self.flops = FlopsModel.for_run(flops_cfg, self.data.tokenizer.vocab_size, data_cfg.seq_len,
                                         data_cfg.mlm_probability)
        self.verify_frozen = verify_frozen and self.mat is not None
        self.progress = Progress(patience_from=run_cfg.patience_from)

        # restores engine.mat's state too; another DP size / ZeRO stage goes through a universal copy (universal.py)
        state = checkpoint.load(self.engine, run_cfg.save_dir, run_cfg.resume, universal=run_cfg.universal)
        if state is not None:
            self.progress = Progress(**state["progress"])
            if self.progress.patience_from != run_cfg.patience_from:
                # A run continued under a different patience_from (e.g. the converge harness's raptr): the restored
                # count was made under the old rule, so early stopping starts counting afresh from here.
                self.progress.best_eval, self.progress.evals_since_best = float("inf"), 0
                self.progress.best_step = 0
                self.progress.patience_from = run_cfg.patience_from
        stage = int(self.engine.zero_optimization_stage())
        self.config_dict = {**as_dict(model_cfg, data_cfg, run_cfg, self.mat_cfg), "deepspeed": ds_config,
                            "world_size": self.world, "zero_stage": stage,
                            "n_params": sum(int(getattr(p, "ds_numel", p.numel())) for p in self.model.parameters())}
        self.tracker = Tracker(run_cfg.out_dir, run_cfg.run_name, run_cfg.wandb_project, run_cfg.wandb_mode,
                               self.config_dict, enabled=self.is_main,
                               resume_step=self.progress.step if state is not None else None)

    def forward(self, batch: dict) -> torch.Tensor:
        """The loss of one micro-batch through the engine (an HF model gets keyword arguments and returns .loss)."""
        batch = {k: v.to(self.engine.device) for k, v in batch.items()}  # batches are built on the CPU
        if not self.hf:
            return self.engine(batch["input_ids"], batch["labels"])
        mask = (batch["input_ids"] != self.data.tokenizer.pad_id).long()
        return self.engine(input_ids=batch["input_ids"], attention_mask=mask, labels=batch["labels"]).loss

    # -- evaluation -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, blocks: torch.Tensor, max_batches: int) -> float:
        """Token-weighted mean loss over deterministic batches (``data.iter_eval_batches``: same count on every rank)."""
        total = torch.zeros(2, dtype=torch.float64)
        path = getattr(self.model, "active_layers", None)
        if path is not None:
            self.model.active_layers = [True] * self.model_cfg.n_layer  # always evaluate the whole model
        self.engine.eval()
        for batch in iter_eval_batches(blocks, self.micro, self.dp_rank, self.dp_size, max_batches, self.objective,
                                       self.data.tokenizer, self.data_cfg.mlm_probability, self.run_cfg.seed + 99):
            loss = self.forward(batch)
            targets = targets_of(batch["labels"], self.objective) if self.hf else self.model.token_targets(batch["labels"])
            n_tok = int((targets != -100).sum())
            total += torch.tensor([float(loss) * n_tok, n_tok], dtype=torch.float64)
        self.engine.train()
        if path is not None:
            self.model.active_layers = path
        if self.world > 1:
            total = total.to(comm_device())
            dist.all_reduce(total)
            total = total.cpu()
        return float(total[0] / total[1].clamp_min(1))

    # -- the loop ---------------------------------------------------------------------------------------------------
    def train(self) -> dict:
        run, p = self.run_cfg, self.progress
        if p.step >= run.train_steps and self.is_main:
            print(f"[mat_ds] checkpoint is already at step {p.step} >= train_steps={run.train_steps}; nothing to do")
        last_val = float("nan")
        while p.step < run.train_steps and not self._budget_spent() and not self._patience_spent():
            step = p.step
            t0 = time.perf_counter()
            refresh_before = self.mat.refresh_seconds_total if self.mat else 0.0
            comm_before = comm_bytes_snapshot() if run.comm_stats else None
            loss_sum = torch.zeros((), dtype=torch.float64)
            aux_sum = torch.zeros((), dtype=torch.float64)
            tokens_routed = torch.zeros(self.n_experts, dtype=torch.float64)
            watch = None
            for micro_step in range(self.accum):
                positions = global_positions(step, micro_step, self.dp_rank, self.dp_size, self.micro, self.accum)
                batch = make_batch(self.data.train, positions, objective=self.objective, tokenizer=self.data.tokenizer,
                                   mlm_probability=self.data_cfg.mlm_probability, seed=run.seed)
                _seed_step(run.seed, step, micro_step * self.dp_size + self.dp_rank)
                loss = self.forward(batch)  # MAT refreshes inside the engine, on refresh steps
                if watch is None and self.verify_frozen:
                    watch = self.mat.snapshot_frozen()  # after this step's decision, before its update
                self.engine.backward(loss)
                self.engine.step()
                # the LM loss; the MoE balancing term is logged apart
                loss_sum += (loss.detach() if self.hf else self.model.last_lm_loss).double().cpu()
                if self.n_experts:
                    aux_sum += float(self.model.aux_loss())
                    tokens_routed += torch.cat([layer.exp_counts.double().cpu().flatten() for layer in self.switch])
            train_loss = float(_allreduce_mean(loss_sum / self.accum, self.world))
            metrics = self.mat.metrics() if self.mat else {}
            if self.n_experts:  # one small all-reduce: [aux, tokens per expert]
                routed = _allreduce_mean(torch.cat([aux_sum.reshape(1) / self.accum, tokens_routed]), self.world)
                metrics["train/aux_loss"] = float(routed[0])
                tokens_routed = routed[1:] * self.world
                metrics.update({f"moe/tokens/{u}": int(v) for u, v in zip(self._expert_names(), tokens_routed.tolist())})
            seconds = time.perf_counter() - t0
            p.step += 1
            p.tokens += self.tokens_per_step
            p.train_seconds += seconds
            self._account_flops(metrics, tokens_routed)
            if self.mat:
                p.refresh_seconds += self.mat.refresh_seconds_total - refresh_before
            metrics.update({
                "train/loss": train_loss,
                "train/lr": self.engine.get_lr()[0],
                "train/tokens": p.tokens,
                "perf/step_seconds": seconds,
                "perf/tokens_per_second": self.tokens_per_step / seconds,
                "perf/flops_cumulative": p.flops + p.probe_flops,
                "perf/train_flops_cumulative": p.flops,
                "perf/train_seconds_cumulative": p.train_seconds,
                "mat/refresh_share": p.refresh_seconds / max(p.train_seconds, 1e-9),
            })
            metrics.setdefault("mat/active_fraction", 1.0)
            if comm_before is not None:
                after = comm_bytes_snapshot()
                delta = {op: after[op] - comm_before.get(op, 0) for op in after}
                metrics["perf/grad_comm_bytes"] = sum(v for op, v in delta.items() if op in GRADIENT_OPS)
                if self.n_experts:
                    metrics["perf/moe_dispatch_bytes"] = delta.get(MOE_DISPATCH_OP, 0)  # token all-to-all (ep > 1)
                metrics["perf/comm_bytes"] = sum(delta.values())
            if watch is not None:
                metrics["mat/frozen_max_abs_change"] = self.mat.frozen_change(watch)
            if not math.isfinite(train_loss):
                raise FloatingPointError(f"train loss is {train_loss} at step {step}")

            last_step = p.step == run.train_steps or self._budget_spent()
            if (run.eval_interval and p.step % run.eval_interval == 0) or last_step:
                last_val = self.evaluate(self.data.val, run.eval_batches)
                metrics.update({"val/loss": last_val, "val/ppl": math.exp(min(last_val, 50))})
                if self.data.test is not None:
                    metrics["test/loss"] = self.evaluate(self.data.test, run.eval_batches)
                self._track_best(metrics.get("test/loss", last_val))
                last_step = last_step or self._patience_spent()
            self.tracker.log(p.step, metrics)
            self._log_heatmap(step, metrics)
            if self.is_main and (p.step % run.log_interval == 0 or p.step == run.train_steps):
                mlp = f" mlp {metrics['mat/active_mlp_fraction']:.2f}" if "mat/active_mlp_fraction" in metrics else ""
                print(f"[mat_ds] step {p.step:5d} loss {train_loss:.4f} active {metrics['mat/active_fraction']:.2f}"
                      f"{mlp} {metrics['perf/tokens_per_second']:.0f} tok/s"
                      + (f" val {last_val:.4f}" if "val/loss" in metrics else ""), flush=True)
            if (run.save_interval and p.step % run.save_interval == 0) or last_step:
                best = checkpoint.tag_for(p.best_step) if p.best_step else None  # retention keeps it
                checkpoint.save(self.engine, run.save_dir, p.step, {"progress": vars(p).copy(),
                                                                    "config": self.config_dict},
                                keep=run.keep_checkpoints, best=best)

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

    # -- bookkeeping outside the loop's reading path -----------------------------------------------------------------
    def _expert_names(self) -> list[str]:
        return [u.name for u in self.mat.units.experts] if self.mat else \
            [f"L{layer.layer}E{e}" for layer in self.switch for e in range(layer.num_experts)]

    def _account_flops(self, metrics: dict, tokens_routed: torch.Tensor) -> None:
        """Analytic FLOPs of the step just taken (frozen heads skip dW, skipped layers cost nothing) + the probe."""
        p = self.progress
        n_skipped = int(self.mat.skipped.sum()) if self.mat and self.mat.layer_path is not None else 0
        H = self.mat.units.heads_per_layer if self.mat else 0  # units per layer (a KV group counts as one)
        frozen_heads = frozen_experts = frozen_mlp = 0
        frozen_expert_tokens = 0
        mlp_groups = self.mat_cfg.mlp_groups
        if self.mat:
            if self.mat.units.mlp:  # like heads: skipped layers' MLP units are in n_skipped already
                frozen_mlp = int(self.mat.frozen_mask("mlp").sum()) - n_skipped * mlp_groups
            # frozen_mask("heads") counts skipped layers' heads too; their saving is in n_skipped already.
            frozen_heads = int(self.mat.frozen_mask("heads").sum()) - n_skipped * H
            frozen_heads *= self.flops.cfg.n_head // max(H, 1)  # in heads (a KV group holds several query heads)
            if self.n_experts:
                frozen = self.mat.frozen_mask("experts")
                frozen_experts = int(frozen.sum())
                frozen_expert_tokens = int(tokens_routed[frozen].sum())
            if "mat/refresh_seconds" in metrics and self.mat.probe is not None:
                p.probe_flops += self.flops.probe_total(self.mat_cfg.probe_samples, self.world,
                                                        mlp="mlp" in self.mat_cfg.modules and bool(self.mat.units.mlp))
        p.flops += self.flops.train_step(self.tokens_per_step, frozen_heads, n_skipped, frozen_expert_tokens,
                                         frozen_mlp, mlp_groups)
        if self.n_experts:
            metrics["mat/frozen_experts"] = frozen_experts

    def _log_heatmap(self, step: int, metrics: dict) -> None:
        every = self.mat_cfg.log_heatmap_interval
        if not (self.mat and every and step % every == 0 and "mat/lambda_max_mean" in metrics):
            return
        L, H = len(self.mat.units.attention_layers), self.mat.units.heads_per_layer
        lam = torch.tensor([metrics[f"mat/lambda_max/{u.name}"] for u in self.mat.units.heads]).view(L, H)
        self.tracker.log_heads(step, lam, self.mat.frozen_mask("heads").view(L, H))
        mlp = self.mat.units.mlp
        if mlp and f"mat/mlp_lambda_max/{mlp[0].name}" in metrics:
            L = len(self.mat.units.mlp_layers)
            lam = torch.tensor([metrics[f"mat/mlp_lambda_max/{u.name}"] for u in mlp]).view(L, -1)
            self.tracker.log_heads(step, lam, self.mat.frozen_mask("mlp").view(L, -1), kind="mlp")

    def _track_best(self, loss: float) -> None:
        """Early stopping's bookkeeping: the test loss when there is test data (the paper's "best test loss" regime:
        train until it has bottomed out), else the validation loss; evaluations before ``patience_from`` do not
        count."""
        p = self.progress
        if p.step < self.run_cfg.patience_from:
            return
        if loss < p.best_eval:
            p.best_eval, p.evals_since_best, p.best_step = loss, 0, p.step
        else:
            p.evals_since_best += 1

    def _patience_spent(self) -> bool:
        return bool(self.run_cfg.patience) and self.progress.evals_since_best >= self.run_cfg.patience

    def _budget_spent(self) -> bool:
        budget = self.run_cfg.flops_budget
        return bool(budget) and self.progress.flops + self.progress.probe_flops >= budget
