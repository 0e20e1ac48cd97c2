"""Script form of ``python -m mat_ds.pretrain`` for launchers that take a file (``deepspeed ... launch/pretrain.py``)."""
from mat_ds.distributed import exit_process
from mat_ds.pretrain import main

if __name__ == "__main__":
    exit_process(main())  # not sys.exit: see exit_process (a teardown abort after a finished run)
