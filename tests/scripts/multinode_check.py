"""The project's trainer (``python -m mat_ds.pretrain``), traced on EVERY rank: for multi-node checks.

    # node 0 and node 1 (here: two launches on one machine, no ssh)
    deepspeed --hostfile H --no_ssh --node_rank 0 --master_addr 127.0.0.1 --master_port P \
        tests/scripts/multinode_check.py --deepspeed_config ds.json --n_layer 2 ...
    deepspeed --hostfile H --no_ssh --node_rank 1 --master_addr 127.0.0.1 --master_port P \
        tests/scripts/multinode_check.py --deepspeed_config ds.json --n_layer 2 ...

Arguments are exactly ``mat_ds.pretrain``'s; the trainer is not changed. Before it runs, this script wraps
``MATController.refresh`` so that every rank (not only rank 0, which writes ``metrics.jsonl``) prints, per refresh,

    MULTINODE {"node_rank": 1, "rank": 1, "world": 2, "step": 10, "frozen_heads": [0, 1, ...], "lambda": [...]}

and, once at start-up, ``MULTINODE_ENV {json}`` with the launcher's variables (CROSS_RANK = node rank, MASTER_ADDR, ...)
and every ``WANDB_*`` / ``MAT_DS_*`` variable the rank sees, so a test can tell which variables reached which node.
"""
from __future__ import annotations

import json
import os
import sys

from mat_ds.core.engine import MATController
from mat_ds.distributed import exit_process

LAUNCH_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "CROSS_RANK", "CROSS_SIZE", "LOCAL_SIZE", "MASTER_ADDR",
               "MASTER_PORT", "OMP_NUM_THREADS", "PYTHONPATH")


def emit(tag: str, record: dict) -> None:
    """One line in ONE write(2) (< PIPE_BUF): the ranks of a node share the launcher's stdout, and print()'s separate
    writes of text and newline can interleave with another rank's line."""
    sys.stdout.flush()
    os.write(1, f"{tag} {json.dumps(record)}\n".encode())


def node_rank() -> int:
    return int(os.environ.get("CROSS_RANK", "0"))  # set by deepspeed.launcher.launch from --node_rank


def env_record() -> dict:
    env = {k: os.environ[k] for k in LAUNCH_KEYS if k in os.environ}
    env.update({k: v for k, v in os.environ.items() if k.startswith(("WANDB_", "MAT_DS_"))})
    return {"node_rank": node_rank(), "rank": int(os.environ.get("RANK", "0")), "env": env}


def install_trace() -> None:
    original = MATController.refresh

    def refresh(self, step):
        metrics = original(self, step)
        lam = [metrics[f"mat/lambda_max/{u.name}"] for u in self.units.heads if f"mat/lambda_max/{u.name}" in metrics]
        emit("MULTINODE", {
            "node_rank": node_rank(), "rank": self.rank, "world": self.world, "step": int(step),
            "frozen_heads": [int(v) for v in self.frozen_mask("heads").tolist()],
            "frozen_experts": [int(v) for v in self.frozen_mask("experts").tolist()],
            "lambda": lam})
        return metrics

    MATController.refresh = refresh


def main() -> int:
    emit("MULTINODE_ENV", env_record())
    install_trace()
    from mat_ds.pretrain import main as pretrain_main

    return pretrain_main(sys.argv[1:])


if __name__ == "__main__":
    exit_process(main())  # not sys.exit: see mat_ds.distributed.exit_process
