"""Script form of ``python -m mat_ds.pretrain`` for launchers that take a file (``deepspeed ... launch/pretrain.py``)."""
import sys

from mat_ds.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
