"""Checkpoint and resume through DeepSpeed checkpoints, with MAT's state in ``client_state``.

What a checkpoint holds: DeepSpeed's model/optimizer/scheduler state (ZeRO-partitioned as DeepSpeed writes it) and, under
the ``"mat_ds"`` key of the client state, the step, cumulative FLOPs/tokens/time, and the policy state (frozen set and
λmax history, plus MAT's temporal reference Δ_1). Data order, MLM masks and dropout are functions of (seed, step), so
nothing else is needed for a resumed run to continue the same loss trajectory.

A checkpoint that cannot be read is a one-line ``CheckpointError``; nothing on disk is modified or removed.
"""
from __future__ import annotations

import os
from typing import Optional

import torch.distributed as dist

CLIENT_KEY = "mat_ds"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, or not from mat_ds. One line, says which path."""


def tag_for(step: int) -> str:
    return f"global_step{step}"


def save(engine, save_dir: str, step: int, state: dict) -> str:
    """Write a checkpoint after ``step`` optimizer steps; DeepSpeed updates ``latest`` only once all files exist."""
    tag = tag_for(step)
    engine.save_checkpoint(save_dir, tag=tag, client_state={CLIENT_KEY: state})
    return os.path.join(save_dir, tag)


def load(engine, save_dir: str, resume: str) -> Optional[dict]:
    """Resume according to ``resume`` ('auto' | 'never' | a tag). Returns the mat_ds state, or None to start fresh."""
    if resume == "never":
        return None
    if resume == "auto":
        latest = os.path.join(save_dir, "latest")
        if not os.path.isfile(latest):
            return None
        with open(latest, encoding="utf-8", errors="replace") as fh:
            tag = fh.read().strip()
    else:
        tag = resume
    path = os.path.join(save_dir, tag)
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} does not exist (resume={resume!r})")
    try:
        load_path, client = engine.load_checkpoint(save_dir, tag=tag)
    except Exception as exc:  # torch.load/unpickling/shape errors all mean the same thing to the user
        msg = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt or incompatible: {type(exc).__name__}: {msg}") from None
    if load_path is None or not client or CLIENT_KEY not in client:
        raise CheckpointError(f"checkpoint {path} could not be loaded or was not written by mat_ds")
    state = client[CLIENT_KEY]
    # ZeRO-3 writes client state per rank; rank 0's copy is authoritative for everyone.
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [state]
        dist.broadcast_object_list(box, src=0)
        state = box[0]
    return state
