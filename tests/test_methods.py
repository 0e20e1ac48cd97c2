"""The method table (benchmarks/methods.py) is the one home of every benchmark's "mat" block: it reproduces the block
of every committed record exactly (so moving the definitions changed no run), and new methods are valid configs."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from benchmarks import converge, methods, paper_table as pt
from mat_ds.core.config import MATConfig

RECORDS = Path(__file__).resolve().parents[1] / "benchmarks" / "records"


def _scale(harness: dict) -> pt.Scale:
    fields = {f.name for f in dataclasses.fields(pt.Scale)}
    return pt.Scale(**{k: v for k, v in harness["scale"].items() if k in fields})


def _records():
    for harness in sorted(RECORDS.glob("**/harness.json")):
        scale = _scale(json.loads(harness.read_text()))
        for spec in sorted(harness.parent.glob("seed*/*/spec.json")):
            yield pytest.param(harness.parent, scale, spec, id=str(spec.parent.relative_to(RECORDS)))


@pytest.mark.parametrize("out,scale,spec", list(_records()))
def test_method_table_reproduces_every_committed_block(out, scale, spec):
    seed, method = int(spec.parent.parent.name[len("seed"):]), spec.parent.name
    recorded = json.loads(spec.read_text())["ds_config"]["mat"]
    assert converge.method_block(method, scale, seed, out) == recorded


def test_placeholders_are_filled_or_refused():
    scale = converge.CONVERGE
    assert methods.block("mat_a0.05_b0", scale, 3) == {
        "policy": "mat", "alpha": 0.05, "beta": 0.0, "warmup_steps": 200, "refresh_interval": 50,
        "probe_samples": 16, "seed": 3, "log_heatmap_interval": 0}
    assert methods.needs("rand_a0.05_b0") == {"rand_fraction"} and methods.needs("raptr") == {"raptr_schedule"}
    with pytest.raises(ValueError, match="rand_fraction"):
        methods.block("rand", scale, 1)
    with pytest.raises(ValueError, match="unknown method"):
        methods.template("nope")


@pytest.mark.parametrize("method", [m for m in methods.METHODS if "$rand_fraction" not in
                                    methods.METHODS[m].values() and m != "raptr"])
def test_every_method_is_a_valid_mat_block(method):
    MATConfig.from_dict(methods.block(method, converge.CONVERGE, 1))
