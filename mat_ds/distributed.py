"""Joining and leaving the process group: the one place every entry point (trainer, examples, benchmarks, test
scripts) does it, with two CPU-only safeguards (see ``init_distributed``).
"""
from __future__ import annotations

import logging
import os
import sys
from datetime import timedelta

import deepspeed
import torch


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

    3. On CPU, unless ``OMP_NUM_THREADS`` is set, each rank gets cores // local ranks intra-op threads.

    ``timeout_minutes`` (or ``MAT_DS_DIST_TIMEOUT_MIN``) bounds every collective; DeepSpeed's default is 30 minutes.
    """
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu" and os.environ.get("MAT_DS_CPU_SHM_OP", "0") != "1":
        import deepspeed.ops
        builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
        if builder is not None:
            deepspeed.ops.__compatible_ops__[builder.NAME] = False  # read by deepspeed.comm.torch.build_shm_op
    if get_accelerator().device_name() == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # Each rank would otherwise start one intra-op thread per core: N ranks x N threads on N cores thrash (measured
        # 7-13x slower gloo runs on 2 cores). Share the cores out, as torchrun does with OMP_NUM_THREADS=1.
        local = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))  # deepspeed / torchrun
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local, 1)))
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


def exit_process(code: int) -> None:
    """End a command-line run with ``code`` without interpreter finalization.

    After ``shutdown_distributed`` a ZeRO-3 gloo rank has still aborted at exit ("terminate called without an active
    exception", exit -6) once in CI (not reproduced in 14 launches here), after every step, checkpoint and log line was
    written. The likely cause is the one pytorch/pytorch#179291 describes: C++ objects still referenced from Python
    (communication handles DeepSpeed keeps) destroyed during interpreter finalization. Nothing is left to do at that
    point, so the command-line entry points (the trainer, and the benchmark and test scripts run under the launcher)
    flush and leave with ``os._exit``: the launcher sees the run's own status (0, or 2 for bad input), not a teardown
    race. Library code (``mat_ds.initialize`` users' scripts) never calls it.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can be written anyway
            pass
    os._exit(code)
