"""Preflight for the multi-rank tests: can N ranks start under the deepspeed launcher and all-reduce over gloo?

    deepspeed --num_gpus 2 tests/scripts/dist_smoke.py

``tests/launcher.py`` runs this once (short timeout) before the first real multi-rank test, so a machine where ranks
cannot rendezvous fails every multi-rank test at once with this script's output, instead of each test hanging until
its own timeout.
"""
from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist

from mat_ds.distributed import exit_process, init_distributed, shutdown_distributed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int, default=-1)
    parser.add_argument("--sleep", type=float, default=0.0, help="Then sleep this long (to test timeout handling).")
    parser.add_argument("--tag", default="", help="Ignored; lets a test find these processes with pgrep.")
    args = parser.parse_args()
    init_distributed(timeout_minutes=2)
    rank, world = dist.get_rank(), dist.get_world_size()
    x = torch.tensor([float(rank + 1)])
    dist.all_reduce(x)
    expected = world * (world + 1) / 2
    if x.item() != expected:
        raise SystemExit(f"all_reduce gave {x.item()}, expected {expected}")
    if rank == 0:
        print(f"DIST_SMOKE ok world={world} backend={dist.get_backend()} "
              f"GLOO_SOCKET_IFNAME={os.environ.get('GLOO_SOCKET_IFNAME')}", flush=True)
    time.sleep(args.sleep)
    shutdown_distributed()


if __name__ == "__main__":
    main()
    exit_process(0)  # no interpreter teardown after the work is done: see mat_ds.distributed.exit_process
