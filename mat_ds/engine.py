"""Building the DeepSpeed engine for a mat_ds model.

* Everything starts trainable: DeepSpeed leaves a parameter that is frozen AT ``initialize`` out of the optimizer
  forever, so MAT freezes only afterwards (``mat_ds/freezing.py``).
* Parameter groups follow ``Transformer.param_groups`` (decay on matrices only); the decay value is the optimizer's
  ``weight_decay`` from the DeepSpeed JSON.
* ``"total_num_steps": "auto"`` in the scheduler block means ``--train_steps`` (the LR schedule ends with the run).
* ``--comm_stats`` switches DeepSpeed's comms logger on (unless the JSON configures it), which is how gradient
  communication bytes per step are measured.
* MoE models (``moe_num_experts > 0``): DeepSpeed splits the optimizer groups into dense and expert groups itself;
  ZeRO-3 is refused with a message that says what to use (DeepSpeed's native MoE does not support it).
* ``init_distributed`` is the one place processes join the process group (trainer, benchmarks, test scripts); see its
  docstring for the two CPU-only safeguards it applies.
"""
from __future__ import annotations

import copy
import os
from datetime import timedelta

import deepspeed
import torch

from .config import ConfigError
from .model import Transformer
from .moe import check_expert_groups

COMMS_LOGGER = {"enabled": True, "prof_all": True, "verbose": False, "debug": False}


LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def init_distributed(timeout_minutes: float | None = None) -> None:
    """Join the process group through ``deepspeed.init_distributed``, with two safeguards for CPU (gloo) runs.

    1. DeepSpeed's CPU accelerator JIT-compiles its shared-memory all-reduce op (``deepspeed_shm_comm``, ~40 s of g++
       on 2 cores) on the first launch on a machine, and every run then leaves 2 x 69 MB segments in ``/dev/shm`` that
       are never unlinked (RAM on tmpfs). Where ``/dev/shm`` cannot be written, its ``shm_initialize`` spins forever
       waiting for the peer's segment. That op serves only ``inference_all_reduce`` (AutoTP inference), never the
       training collectives, so on CPU we switch it off unless ``MAT_DS_CPU_SHM_OP=1``. GPU runs are untouched.
    2. With every rank on this host (``MASTER_ADDR`` loopback) gloo is pinned to the loopback interface
       (``GLOO_SOCKET_IFNAME=lo``) unless the user set it, so a hostname that resolves to an unreachable address cannot
       hang the rendezvous. Multi-node runs (non-loopback master) are untouched.

    ``timeout_minutes`` (or ``MAT_DS_DIST_TIMEOUT_MIN``) bounds every collective; DeepSpeed's default is 30 minutes.
    """
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu" and os.environ.get("MAT_DS_CPU_SHM_OP", "0") != "1":
        import deepspeed.ops
        builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
        if builder is not None:
            deepspeed.ops.__compatible_ops__[builder.NAME] = False  # read by deepspeed.comm.torch.build_shm_op
    if os.environ.get("MASTER_ADDR", "127.0.0.1") in LOOPBACK and "GLOO_SOCKET_IFNAME" not in os.environ \
            and os.path.exists("/sys/class/net/lo"):
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    minutes = timeout_minutes or float(os.environ.get("MAT_DS_DIST_TIMEOUT_MIN", "30"))
    deepspeed.init_distributed(timeout=timedelta(minutes=minutes))
    if not torch.distributed.is_initialized():  # pragma: no cover - deepspeed always initialises or raises
        raise RuntimeError("deepspeed.init_distributed() returned without a process group")


def shutdown_distributed() -> None:
    """Barrier, then tear the process group down. Leaving it to interpreter exit has aborted a gloo rank with
    "terminate called without an active exception" (exit -6) after all its work was done; call this at the end of
    every successful multi-rank entry point (not on an error path, where a peer may never reach the barrier)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def build_engine(model: Transformer, ds_config: dict, train_steps: int, comm_stats: bool = False):
    cfg = copy.deepcopy(ds_config)
    sched = cfg.get("scheduler", {}).get("params", {})
    if sched.get("total_num_steps") == "auto":
        sched["total_num_steps"] = train_steps
    if "optimizer" not in cfg:
        raise ConfigError('the DeepSpeed config needs an "optimizer" block, e.g. {"type": "AdamW", "params": '
                          '{"lr": 5e-4, "weight_decay": 0.01, "torch_adam": true}}')
    weight_decay = float(cfg["optimizer"].get("params", {}).get("weight_decay", 0.0))
    stage = int(cfg.get("zero_optimization", {}).get("stage", 0))
    if model.cfg.moe_num_experts and stage == 3:
        # DeepSpeed asserts deep inside initialize; say it up front and say what works instead.
        raise ConfigError("moe_num_experts > 0 uses DeepSpeed's native MoE layer, which DeepSpeed does not support "
                          "under ZeRO stage 3: use zero_optimization.stage 2 (or 0/1) for MoE runs, or a dense model "
                          "(moe_num_experts 0) for ZeRO-3")
    if comm_stats:
        cfg.setdefault("comms_logger", dict(COMMS_LOGGER))
    try:
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.param_groups(weight_decay),
                                               config=cfg)
    except (ValueError, KeyError, TypeError, AssertionError) as exc:
        # DeepSpeed reports config problems as multi-line pydantic/assert messages; keep the first line.
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"DeepSpeed rejected the config: {first}") from None
    if model.cfg.moe_num_experts:
        check_expert_groups(model)  # DeepSpeed created the expert groups just now
    return engine


def zero_stage(engine) -> int:
    return int(engine.zero_optimization_stage())
