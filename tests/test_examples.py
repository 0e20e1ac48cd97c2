"""The user-facing examples (examples/*.py) run as users run them: ``deepspeed --num_gpus 2 examples/X.py ...``.

Each example trains 30 steps with the default examples/ds_config_mat.json (micro batch 8 x 2 ranks = the 16 probe
samples at step 0; refresh every 5 steps; warm-up 10 steps; alpha 0.3, so at every refresh after warm-up at least the
unit with the smallest λmax is frozen) and checkpoints every 10 steps. One launch per example, shared by the tests of
this module; the resume test adds one launch (BERT, resumed from the step-10 checkpoint up to step 20).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tests.launcher import REPO, run_deepspeed, tagged_json

EXAMPLES = REPO / "examples"
STEPS, SAVE_INTERVAL, TIMEOUT = 30, 10, 420
WARMUP, REFRESH = 10, 5  # examples/ds_config_mat.json "mat" block
UNITS = {  # MAT units of the examples' tiny default models (2 layers, 4 heads)
    "hf_bert_mlm.py": 2 * 4,  # L·H
    "hf_gpt2_clm.py": 2 * 4,  # L·H
    "hf_llama_clm.py": 2 * 2,  # L·H_kv: 4 query heads share 2 KV heads, a unit is one KV group
}


@pytest.fixture(scope="module")
def example_run(tmp_path_factory):
    """``example_run(name)`` -> (stdout, checkpoint dir) of the 30-step run of ``examples/name`` (launched once)."""
    cache = tmp_path_factory.mktemp("tokenizer_cache")  # one tokenizer + corpus cache for every launch
    runs: dict = {}

    def run(name: str):
        if name not in runs:
            save_dir = tmp_path_factory.mktemp(Path(name).stem) / "ckpt"
            res = run_deepspeed(EXAMPLES / name, example_args(STEPS, save_dir, cache), num_gpus=2, timeout=TIMEOUT)
            assert res.returncode == 0
            runs[name] = (res.stdout, save_dir, cache)
        return runs[name]

    return run


def example_args(steps: int, save_dir: Path, cache: Path) -> list[str]:
    return ["--steps", str(steps), "--save_dir", str(save_dir), "--save_interval", str(SAVE_INTERVAL),
            "--cache_dir", str(cache)]


@pytest.mark.parametrize("name", sorted(UNITS))
def test_example_trains_and_freezes(example_run, name):
    stdout, save_dir, _ = example_run(name)
    steps = tagged_json(stdout, "STEP")
    assert [s["step"] for s in steps] == list(range(STEPS)), stdout[-3000:]
    losses = [s["loss"] for s in steps]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, losses
    units = UNITS[name]
    for s in steps:
        # λmax of every unit on refresh steps (the probe set is full at step 0), nothing in between
        assert s["lambda_keys"] == (units if s["step"] % REFRESH == 0 else 0), s
        assert s["active_fraction"] == pytest.approx(1 - len(s["frozen"]) / units), s
        if s["step"] < WARMUP:
            assert s["frozen"] == [] and s["frozen_params"] == 0, s
        else:  # alpha=0.3: the smallest-λmax unit is always below the modular threshold
            assert s["active_fraction"] < 1 and s["frozen_params"] > 0, s
    assert (save_dir / "latest").read_text().strip() == f"global_step{STEPS}"
    print(f"{name}: loss first5 {sum(losses[:5]) / 5:.3f} -> last5 {sum(losses[-5:]) / 5:.3f}, units {units}, "
          f"active fraction at steps 10/20/29: {[steps[i]['active_fraction'] for i in (10, 20, 29)]}")


def _state(ckpt: Path, tag: str) -> dict:
    return torch.load(ckpt / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)


def test_bert_resume_is_exact(example_run, tmp_path):
    """Resume from the step-10 checkpoint of the uninterrupted run and train to step 20: same losses, same frozen sets,
    same MAT state (λ history, frozen sets, probe set) and bit-identical weights at step 20."""
    name = "hf_bert_mlm.py"
    stdout, full_dir, cache = example_run(name)
    full = {s["step"]: s for s in tagged_json(stdout, "STEP")}
    resumed_dir = tmp_path / "ckpt"
    shutil.copytree(full_dir / "global_step10", resumed_dir / "global_step10")
    (resumed_dir / "latest").write_text("global_step10")

    res = run_deepspeed(EXAMPLES / name, example_args(20, resumed_dir, cache), num_gpus=2, timeout=TIMEOUT)
    assert res.returncode == 0
    assert [r["step"] for r in tagged_json(res.stdout, "RESUMED")] == [10], res.stdout[-3000:]
    steps = tagged_json(res.stdout, "STEP")
    assert [s["step"] for s in steps] == list(range(10, 20)), res.stdout[-3000:]
    for s in steps:
        assert s == full[s["step"]]  # loss (exact), λ count, active fraction, frozen params and frozen set
    assert any(s["frozen"] for s in steps)
    print(f"resume: max |loss diff| steps 10..19 = {max(abs(s['loss'] - full[s['step']]['loss']) for s in steps)}, "
          f"frozen after resume {steps[0]['frozen']} (uninterrupted {full[10]['frozen']})")

    a, b = _state(full_dir, "global_step20"), _state(resumed_dir, "global_step20")
    mat_a, mat_b = a["mat"], b["mat"]
    assert mat_b["policies"] == mat_a["policies"]  # λ history since step 0, Δ references, frozen set
    assert [step for step, _ in mat_b["policies"]["heads"]["history"]] == [0, 5, 10, 15]
    assert mat_a["probe"]["batch"].keys() == mat_b["probe"]["batch"].keys()
    assert all(torch.equal(mat_a["probe"]["batch"][k], mat_b["probe"]["batch"][k]) for k in mat_a["probe"]["batch"])
    assert a["module"].keys() == b["module"].keys()
    assert all(torch.equal(a["module"][k], b["module"][k]) for k in a["module"])
