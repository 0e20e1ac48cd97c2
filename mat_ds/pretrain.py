"""Pretrain a transformer with DeepSpeed, Modular Adaptive Training switched on by the "mat" block of the config.

    deepspeed --num_gpus 2 --module mat_ds.pretrain --deepspeed_config configs/bert_mat_zero2.json
    deepspeed --num_gpus 2 launch/pretrain.py --deepspeed_config configs/bert_mat_zero2.json --arch gpt \
        --train_data ../shared/data/wikitext-2/valid.txt --test_data ../shared/data/wikitext-2/test.txt

Every model/data/run setting is a flag (``--help``); MAT's settings live in the JSON, and the JSON may pin model
settings in a ``"model"`` block (flags win), e.g. the Switch-Transformer configs:

    deepspeed --num_gpus 2 launch/pretrain.py --deepspeed_config configs/switch_mat_ep2.json

Bad input ends with one
``error: ...`` line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import sys

from .checkpoint import CheckpointError
from .config import ConfigError, MATConfig, add_cli_arguments, from_cli, load_deepspeed_config
from .data import DataError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deepspeed_config", required=True, help="DeepSpeed JSON with an optional \"mat\" block.")
    parser.add_argument("--local_rank", type=int, default=-1, help="Set by the deepspeed launcher.")
    parser.add_argument("--verify_frozen", action="store_true",
                        help="Check every step that frozen heads changed by exactly 0 (logs mat/frozen_max_abs_change).")
    add_cli_arguments(parser)
    args = parser.parse_args(argv)
    trainer = None
    try:
        ds_config = load_deepspeed_config(args.deepspeed_config)
        model_cfg, data_cfg, run_cfg = from_cli(args, ds_config)
        mat_cfg = MATConfig.from_dict(ds_config.get("mat"))  # parsed once: before any process group or data work
        if model_cfg.model.startswith("hf:"):
            from .models.hf import hf_directory

            hf_directory(model_cfg.model)
        from .train import Trainer

        trainer = Trainer(model_cfg, data_cfg, run_cfg, ds_config, verify_frozen=args.verify_frozen, mat_cfg=mat_cfg)
        trainer.train()
        from .distributed import shutdown_distributed

        shutdown_distributed()  # every rank finished the same loop; tear the process group down in order
    except (ConfigError, DataError, CheckpointError) as exc:
        _report(exc)
        return 2
    finally:
        if trainer is not None:
            trainer.close()  # the out_dir lock
    return 0


def _report(exc: Exception) -> None:
    """``error: ...`` on stderr. An error every rank raised together (``every_rank``: a checkpoint that cannot be
    loaded, an out_dir held by another run) is printed by rank 0 alone, and the other ranks wait for that line before
    they exit (the launcher kills the remaining ranks as soon as one exits)."""
    import torch.distributed as dist

    from .core.topology import Topology

    whole = Topology.current()
    together = getattr(exc, "every_rank", False) and whole.world > 1
    if whole.rank == 0 or not getattr(exc, "every_rank", False):
        print(f"error: {exc}", file=sys.stderr, flush=True)
    if together:
        try:
            dist.barrier()
        except Exception:  # noqa: BLE001 - a peer already gone: nothing left to wait for
            pass


if __name__ == "__main__":
    from .distributed import exit_process

    exit_process(main())  # not sys.exit: see exit_process (a teardown abort after a finished run)
