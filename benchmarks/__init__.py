"""Side-by-side benchmarks of mat_ds (see ``benchmarks/README.md``).

A plain directory of scripts that is also importable as ``benchmarks`` from the repository root (no ``sys.path``
edits): ``python -m benchmarks.paper_table``, ``from benchmarks import plots``. Multi-rank benchmarks are scripts for
the launcher: ``deepspeed --num_gpus 2 benchmarks/freeze_speed.py ...``; they import only ``mat_ds``.
"""
