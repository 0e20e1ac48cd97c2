"""``python -m mat_ds.pretrain`` with one addition for tests/test_universal.py: right after the trainer resumed (the
checkpoint loaded, MAT's state restored; before the first step), rank 0 writes what the run now holds to
``$MAT_DS_UNIVERSAL_DUMP`` (torch.save): ``engine.mat.state_dict()``, every parameter's full value (ZeRO-3: gathered),
and the units MAT has frozen. Everything else is the trainer, unchanged, under the real ``deepspeed`` launcher."""
from __future__ import annotations

import os

import torch

from mat_ds import train
from mat_ds.distributed import exit_process
from mat_ds.pretrain import main

_setup = train.Trainer._setup


def _setup_and_dump(self, *args, **kwargs):
    _setup(self, *args, **kwargs)
    path = os.environ.get("MAT_DS_UNIVERSAL_DUMP")
    if not path or self.mat is None:
        return
    params = list(self.model.named_parameters())
    if self.engine.zero_optimization_stage() == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in params]):  # collective: every rank
            weights = {n: p.detach().clone() for n, p in params}
    else:
        weights = {n: p.detach().clone() for n, p in params}
    if self.is_main:
        frozen = [[p_name for p_name, p in params if any(p is q for q in u.params)] for u in self.mat.frozen_units()]
        torch.save({"mat": self.mat.state_dict(), "weights": weights, "frozen": frozen,
                    "step": self.progress.step, "world": self.world}, path)


train.Trainer._setup = _setup_and_dump

if __name__ == "__main__":
    exit_process(main())
