"""``MATController``: Modular Adaptive Training inside a live DeepSpeed engine (``engine.mat``).

The facade that builds it (``mat_ds.initialize``, ``prepare_model``, ``attach``: ``mat_ds/wrapper.py``) converts the
model with the adapters and hands the controller the model's units; this module knows units, never model families.
It runs inside the engine through one forward pre-hook: at the first training forward of every optimizer step (the
step boundary; never inside gradient accumulation) it collects probe samples until the probe set is full, and on
refresh steps measures λmax (``mntk.probe_units``), lets each kind's policy decide on rank 0, broadcasts the decision
and freezes (``freezing.FreezeController``). ``engine.save_checkpoint``/``load_checkpoint`` carry MAT's state in the
client state under ``"mat"`` (λ history, frozen sets, policy and probe set).

Per-step metrics: ``engine.mat.metrics()`` (``mat/`` keys; λmax per unit on refresh steps). When DeepSpeed's monitor
is enabled (``"wandb"``/``"tensorboard"``/``"csv_monitor"`` blocks) they are written there too, at ``global_samples``.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

import torch
import torch.distributed as dist

from .config import ConfigError, MATConfig
from .freezing import FreezeController
from .mntk import probe_units
from .policy import Policy, make_policy
from .probe import ProbeSet
from .tensor_parallel import sharded_tp_size
from .topology import Topology
from .units import KINDS, ModelUnits, Unit

CLIENT_KEY = "mat"


class MATController:
    """MAT inside a live DeepSpeed engine (``engine.mat``). See the module docstring for when it acts."""

    def __init__(self, engine, cfg: MATConfig, units: ModelUnits, probe_fn: Optional[Callable],
                 probe_batch: Optional[dict], layer_path=None):
        self.engine, self.cfg, self.units = engine, cfg, units
        self.topology = Topology.from_engine(engine)  # THE layout (ranks, DP/TP groups, ZeRO stage), read once
        self.rank, self.world = self.topology.rank, self.topology.world
        sharded = sharded_tp_size(engine.module)
        if sharded != self.topology.tp_size:
            raise ConfigError(f"the model's head-wise layers are sharded for tensor parallelism {sharded} but the "
                              f"engine runs tensor_parallel.autotp_size={self.topology.tp_size}: build it with "
                              f"mat_ds.initialize (or prepare_model with the same DeepSpeed config)")
        self.probe_fn = probe_fn
        cfg.check_model(len(units.attention_layers) or 1, layers=sorted({u.layer for u in units.all()}))
        if self.rank == 0:  # the rule this run decides with (after preset and DEFAULTS), once
            print(f"[mat_ds] {cfg.describe()}", flush=True)
        self.layer_path = layer_path if cfg.policy == "raptr" else None
        if cfg.policy == "raptr" and layer_path is None:
            raise ConfigError("mat.policy='raptr' skips whole layers, which mat_ds supports for its own Transformer "
                              "only; use policy mat, rand or multirate for this model")
        self.n_layers = layer_path.n_layers if self.layer_path is not None else max(len(units.attention_layers), 1)
        # Freezer modules: the units kind by kind (units.KINDS: heads, MLP units, experts), then (RaPTr) each layer's
        # non-unit parameters.
        bodies = self.layer_path.bodies() if self.layer_path is not None else []
        self.freezer = FreezeController(engine, [u.params for u in units.all()] + bodies)
        # One policy per unit kind: λmax scales differ between heads, MLP units and experts, so each has its own
        # threshold. RaPTr selects layers, not units: only its head policy (which carries the layer path) runs.
        self.policies: dict[str, Policy] = {}
        self.selecting: list[str] = []  # the kinds whose policy decides (and schedules refreshes)
        for kind in KINDS:
            n = len(units.of_kind(kind))
            selects = kind in cfg.modules and n > 0 and not (kind != "heads" and cfg.policy == "raptr")
            groups = [u.layer for u in units.of_kind(kind)]
            self.policies[kind] = (make_policy(cfg, n, self.n_layers, groups) if selects
                                   else Policy(cfg, n, self.n_layers, groups))
            if selects:
                self.selecting.append(kind)
        self.skipped = torch.zeros(self.n_layers, dtype=torch.bool)
        self.probe = (ProbeSet(cfg.probe_samples, probe_batch, _forward_of(engine.module), group=self.topology.dp_group)
                      if cfg.needs_probe else None)
        if self.probe is not None and self.probe.ready:
            self._check_probe_fits()
        self.refresh_seconds_total = 0.0
        self.last_probe = None  # the last UnitProbe (Grams, comm bytes), for inspection
        self._step_seen = -1
        self._pending: dict[str, float] = {}
        self._hook = engine.register_forward_pre_hook(self._before_forward, with_kwargs=True)
        self._wrap_checkpointing()

    # -- the hook --------------------------------------------------------------------------------------------------
    def _before_forward(self, _module, args, kwargs):
        if not (self.engine.training and torch.is_grad_enabled()):
            return None  # evaluation, or a forward under no_grad: MAT does nothing
        step = self.step
        if step == self._step_seen:
            return None  # a later micro-batch of the same optimizer step: decisions hold inside accumulation
        self._step_seen = step
        if self.probe is not None and not self.probe.ready:
            self.probe.observe(args, kwargs)
            if self.probe.ready:
                self._check_probe_fits()
        if self.is_refresh_step(step):
            # The probe must not move the training RNG stream (DeepSpeed's RTS gates draw random numbers even in
            # eval mode): a run's dropout masks and routing are then the same whether or not it refreshes here.
            with torch.random.fork_rng(devices=_rng_devices()):
                self.refresh(step)
        self._write_monitor()
        return None

    def _check_probe_fits(self) -> None:
        """Every head-wise layer's Gram must fit ``mat.probe_memory_mb`` in the chosen form (``ghost.choose``): said
        once, when the probe set is known, instead of an out-of-memory error in the middle of a run."""
        from .ghost import choose

        n, T = self.probe.batch["input_ids"].shape[:2]
        for mods in [*self.units.attention_layers.values(), *self.units.mlp_layers.values()]:
            for m in mods:
                try:
                    choose(m, n, T, self.cfg.probe_gram, self.cfg.probe_memory_mb << 20)
                except ValueError as exc:
                    raise ConfigError(str(exc)) from None

    @property
    def step(self) -> int:
        """MAT's clock: optimizer steps that happened. DeepSpeed counts an overflow-skipped step in ``global_steps``
        (and in ``skipped_steps``); it updated nothing, so MAT neither counts it nor refreshes for it."""
        return int(self.engine.global_steps) - int(getattr(self.engine, "skipped_steps", 0) or 0)

    def is_refresh_step(self, step: int) -> bool:
        if self.probe is not None and not self.probe.ready:
            return False  # nothing to measure yet (see probe.ProbeSet): keep training everything
        return any(self.policies[kind].is_refresh_step(step) for kind in self.selecting)

    # -- one refresh -----------------------------------------------------------------------------------------------
    def refresh(self, step: int) -> dict:
        """Measure (if the policy needs λmax), decide on rank 0, broadcast, freeze. Returns this refresh's metrics."""
        t0 = time.perf_counter()
        lam: dict[str, Optional[torch.Tensor]] = {kind: None for kind in KINDS}
        metrics: dict[str, float] = {}
        if self.probe is not None:
            device = next(self.engine.module.parameters()).device
            want_experts = "experts" in self.cfg.modules and bool(self.units.experts)
            want_mlp = "mlp" in self.cfg.modules and bool(self.units.mlp)
            result = probe_units(self.engine.module, self.units, self.probe.on(device), self.probe_fn,
                                 experts=want_experts, gram=self.cfg.probe_gram,
                                 memory_limit_bytes=self.cfg.probe_memory_mb << 20, mlp=want_mlp,
                                 topology=self.topology)
            if self.engine.zero_optimization_stage() == 3:
                self.engine.empty_partition_cache()  # the probe's backward stops early: release what it gathered
            self.last_probe = result
            if "heads" in self.cfg.modules and self.units.heads:
                lam["heads"] = result.head_lambda_max(self.cfg.probe_normalize)
            if result.mlp_grams is not None:
                lam["mlp"] = result.mlp_lambda_max(self.cfg.probe_normalize)
            if result.expert_grams is not None:
                lam["experts"] = result.expert_lambda_max(self.cfg.probe_normalize)
            metrics.update(result.metrics())
        masks = {kind: policy.update(step, lam[kind]) for kind, policy in self.policies.items()}
        masks["layers"] = self.policies["heads"].skipped_layers(step)
        masks = broadcast_masks(masks, self.world)
        for kind, policy in self.policies.items():
            policy.frozen = masks[kind]
        self._apply(masks["layers"])
        seconds = time.perf_counter() - t0  # MAT's overhead: probe + policy + applying it
        self.refresh_seconds_total += seconds
        metrics["mat/refresh_seconds"] = seconds
        metrics["mat/frozen_heads"] = int(self.policies["heads"].frozen.sum())
        if self.units.mlp:
            metrics["mat/frozen_mlp"] = int(self.policies["mlp"].frozen.sum())
        if self.units.experts:
            metrics["mat/frozen_experts"] = int(self.policies["experts"].frozen.sum())
        for kind, key in (("heads", "mat/lambda_max/"), ("mlp", "mat/mlp_lambda_max/"),
                          ("experts", "mat/expert_lambda_max/")):
            if lam[kind] is not None:
                metrics.update({key + u.name: float(v) for u, v in zip(self.units.of_kind(kind), lam[kind].tolist())})
        if lam["heads"] is not None:
            metrics["mat/lambda_max_mean"] = float(lam["heads"].mean())
        self._pending.update(metrics)
        return metrics

    def _apply(self, skipped: torch.Tensor) -> None:
        """Freeze what the policies froze, plus everything in layers RaPTr skips this step; set the layer path."""
        self.skipped = skipped.clone()
        self.freezer.apply(torch.cat([self.frozen_mask(kind) for kind in KINDS]
                                     + [skipped if self.layer_path is not None else torch.zeros(0, dtype=torch.bool)]))
        if self.layer_path is not None:
            self.layer_path.set_active((~skipped).tolist())

    # -- state the user (and the trainer) reads ---------------------------------------------------------------------
    def frozen_mask(self, kind: str) -> torch.Tensor:
        """Units of ``kind`` that do not train this step: frozen by the policy, or in a layer RaPTr skips."""
        units = self.units.of_kind(kind)
        mask = self.policies[kind].frozen.clone()
        if self.layer_path is not None and units:
            mask |= self.skipped[torch.tensor([u.layer for u in units])]
        return mask

    def frozen_units(self) -> list[Unit]:
        return [u for kind in KINDS for u, f in zip(self.units.of_kind(kind), self.frozen_mask(kind))
                if f]

    def metrics(self) -> dict[str, float]:
        """This step's ``mat/`` metrics: state of the frozen sets, plus λmax and refresh costs if it was a refresh
        step (those are returned once)."""
        heads = self.frozen_mask("heads")
        out = dict(self._pending)
        self._pending = {}
        out.update({"mat/active_fraction": 1.0 - float(heads.float().mean()) if heads.numel() else 1.0,
                    "mat/frozen_params": self._frozen_numel(),
                    "mat/refresh_seconds_total": self.refresh_seconds_total})
        if self.layer_path is not None:
            out["mat/skipped_layers"] = int(self.skipped.sum())
        if self.units.mlp:
            mlp = self.frozen_mask("mlp")
            out.update({"mat/active_mlp": int((~mlp).sum()), "mat/active_mlp_fraction": float((~mlp).float().mean())})
        if self.units.experts:
            experts = self.frozen_mask("experts")
            out.update({"mat/active_experts": int((~experts).sum()),
                        "mat/active_expert_fraction": float((~experts).float().mean())})
        return out

    def _frozen_numel(self) -> int:
        """Frozen parameters of the whole model. Under tensor parallelism a rank holds only its units, but all units
        of a (kind, layer) have the same size, and every TP rank holds some of each layer's: count from those."""
        if not self.topology.tensor_parallel:
            return self.freezer.frozen_numel()
        size = {(u.kind, u.layer): sum(p.numel() for p in u.params) for u in self.units.all() if u.params}
        return sum(size[(u.kind, u.layer)] for u in self.frozen_units())

    def _write_monitor(self) -> None:
        monitor = getattr(self.engine, "monitor", None)
        if monitor is None or not getattr(monitor, "enabled", False) or self.rank != 0:
            return
        samples = int(self.engine.global_samples)
        monitor.write_events([(k, float(v), samples) for k, v in self.metrics_peek().items()])

    def metrics_peek(self) -> dict[str, float]:
        """``metrics()`` without consuming the refresh metrics."""
        pending = dict(self._pending)
        out = self.metrics()
        self._pending = pending
        return out

    # -- "frozen means frozen": a check any script can run ----------------------------------------------------------
    @staticmethod
    def _local(p: torch.nn.Parameter) -> torch.Tensor:
        return p.ds_tensor if hasattr(p, "ds_tensor") else p.data  # ZeRO-3: this rank's shard

    def snapshot_frozen(self) -> dict:
        """Copies of this rank's part of every frozen unit's parameters (take it right after ``engine.step()``)."""
        return {(u.kind, u.layer, u.index): [self._local(p).detach().clone() for p in u.params]
                for u in self.frozen_units()}

    def frozen_change(self, snapshot: dict) -> float:
        """Max |ΔW| since ``snapshot`` over units still frozen, max over all ranks (a collective: call on all)."""
        now = {(u.kind, u.layer, u.index): u.params for u in self.frozen_units()}
        worst = torch.zeros((), dtype=torch.float64)
        for key, before in snapshot.items():
            for b, p in zip(before, now.get(key, [])):
                worst = torch.maximum(worst, (self._local(p).detach() - b).abs().max().double().cpu())
        if self.world > 1:
            worst = worst.to(comm_device())
            dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        return float(worst)

    # -- checkpoints -----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"policies": {k: p.state_dict() for k, p in self.policies.items()},
                "skipped": self.skipped.tolist(), "refresh_seconds_total": self.refresh_seconds_total,
                "probe": self.probe.state_dict() if self.probe is not None else None, "step_seen": self._step_seen}

    def load_state_dict(self, state: dict) -> None:
        for kind, policy in self.policies.items():
            if kind not in state["policies"] and not self.units.of_kind(kind):
                continue  # a checkpoint from before this kind existed, and the model has no such units
            if kind not in state["policies"]:
                raise ConfigError(f"the checkpoint has no MAT state for unit kind {kind!r}, which this run selects "
                                  f"(mat.modules): resume with the modules it was written with")
            policy.load_state_dict(state["policies"][kind])
        if self.probe is not None and state.get("probe"):
            self.probe.load_state_dict(state["probe"])
        self.refresh_seconds_total = float(state.get("refresh_seconds_total", 0.0))
        self._step_seen = int(state.get("step_seen", -1))
        self._apply(torch.tensor(state["skipped"], dtype=torch.bool))

    def _wrap_checkpointing(self) -> None:
        """Route MAT's state through DeepSpeed's checkpoint client state. Wrapping the two bound methods of this
        engine instance (not subclassing) keeps ``engine`` the object DeepSpeed (or accelerate) built."""
        engine = self.engine
        save, load = engine.save_checkpoint, engine.load_checkpoint

        def save_checkpoint(save_dir, tag=None, client_state=None, save_latest=True,
                            exclude_frozen_parameters=False):
            if exclude_frozen_parameters:
                raise ConfigError("exclude_frozen_parameters=True would drop the weights of units MAT froze for now "
                                  "(they train again later): save with exclude_frozen_parameters=False")
            client_state = dict(client_state or {})
            client_state[CLIENT_KEY] = self.state_dict()
            return save(save_dir, tag=tag, client_state=client_state, save_latest=save_latest)

        def load_checkpoint(load_dir, tag=None, **kwargs):
            path, client = load(load_dir, tag=tag, **kwargs)
            state = (client or {}).pop(CLIENT_KEY, None) if path is not None else None
            if path is not None and self.world > 1:
                box = [state]  # ZeRO-3 writes client state per rank; rank 0's copy is authoritative for everyone
                dist.broadcast_object_list(box, src=0)
                state = box[0]
            if state is not None:
                self.load_state_dict(state)
            return path, client

        engine.save_checkpoint, engine.load_checkpoint = save_checkpoint, load_checkpoint


def broadcast_masks(masks: dict[str, torch.Tensor], world: int) -> dict[str, torch.Tensor]:
    """Rank 0's boolean masks, on every rank (ranks disagreeing would abort gloo or hang NCCL in the reduction)."""
    if world <= 1:
        return {k: v.bool() for k, v in masks.items()}
    keys = sorted(masks)
    sizes = [masks[k].numel() for k in keys]
    packed = torch.cat([masks[k].flatten().to(torch.uint8) for k in keys]).to(comm_device())
    dist.broadcast(packed, src=0)
    return {k: part.bool().cpu() for k, part in zip(keys, packed.split(sizes))}


def comm_device() -> torch.device:
    """Where a small tensor must live for a collective: the accelerator under NCCL, else the CPU (gloo)."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        from deepspeed.accelerator import get_accelerator
        return torch.device(get_accelerator().current_device_name())
    return torch.device("cpu")


def _rng_devices() -> list:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return [torch.cuda.current_device()]
    return []


def _forward_of(module: torch.nn.Module) -> Callable:
    return module.forward
