"""benchmarks/freeze_speed.py's report math on synthetic numbers: arms and masks, medians and ratios, the FLOPs per
arm, the page. No timing is measured or asserted, nothing is launched."""
import json
import statistics

import pytest
import torch

from benchmarks import freeze_speed as fs
from mat_ds.config import ModelConfig
from mat_ds.core.units import Unit
from mat_ds.models.flops import FlopsModel


def test_arm_specs_with_and_without_mlp():
    arms = fs.arm_specs([0.25, 0.5, 0.75], n_head=4, mlp_groups=4)
    assert list(arms) == ["full", "full_again", "heads_0.25", "heads_mlp_0.25", "heads_0.5", "heads_mlp_0.5",
                          "heads_0.75", "heads_mlp_0.75", "unconverted"]
    assert arms["heads_0.5"] == {"engine": "converted", "heads": 2, "mlp": 0}
    assert arms["heads_mlp_0.75"] == {"engine": "converted", "heads": 3, "mlp": 3}
    assert arms["unconverted"] == {"engine": "unconverted", "heads": 0, "mlp": 0}
    none = {"engine": "converted", "heads": 0, "mlp": 0}
    assert fs.arm_specs([0.5], n_head=8, mlp_groups=None) == {
        "full": none, "full_again": none, "heads_0.5": {"engine": "converted", "heads": 4, "mlp": 0}}


def test_unit_mask_follows_units_all_order():
    units = ([Unit("heads", l, u) for l in range(2) for u in range(4)]
             + [Unit("mlp", l, g) for l in range(2) for g in range(2)] + [Unit("experts", 1, 0)])
    mask = fs.unit_mask(units, heads=1, mlp=1)
    assert mask.dtype == torch.bool and mask.tolist() == [True, False, False, False] * 2 + [True, False] * 2 + [False]
    assert not fs.unit_mask(units, 0, 0).any()


def test_arm_flops_matches_hand_count():
    cfg = ModelConfig(n_layer=4, n_head=4, d_model=128)  # d_ff = 512
    flops = FlopsModel(cfg, vocab_size=2048, seq_len=64, predicted_fraction=0.4)
    tokens, L, d, dff, G = 2048, 4, 128, 512, 4
    full = fs.arm_flops(flops, tokens, L, {"heads": 0, "mlp": 0}, G)
    assert full == flops.train_step(tokens)
    both = fs.arm_flops(flops, tokens, L, {"heads": 2, "mlp": 2}, G)
    frozen = L * (2 * 4 * (d // 4) * d + 2 * 2 * d * dff // G)  # heads: 4·d_head·d; MLP unit: 2·d·d_ff/G
    assert full - both == 2 * tokens * frozen  # only the dW of the frozen weights is saved
    heads_only = fs.arm_flops(flops, tokens, L, {"heads": 2, "mlp": 0}, G)
    assert full - heads_only == 2 * tokens * L * 2 * 4 * (d // 4) * d
    assert fs.arm_flops(flops, tokens, L, {"heads": 0, "mlp": 0}, None) == full


def test_median_and_round_ratios():
    assert fs.median_ratio([1.0, 3.0, 2.0], [2.0, 4.0, 6.0]) == pytest.approx(0.5)
    assert fs.round_ratios([[1.0, 2.0, 3.0], [4.0]], [[4.0, 4.0, 4.0], [2.0]]) == pytest.approx([0.5, 2.0])
    assert fs.round_ratios([[1.0], []], [[2.0], [1.0]]) == pytest.approx([0.5])  # an empty block is skipped


def _arm(engine, heads, mlp, scale, flops, rounds=((1.0, 1.2, 1.1), (0.9, 1.0, 1.3))):
    raw = {k: [[scale * f * t for t in r] for r in rounds] for k, f in
           (("step_s", 1.0), ("step_cpu_s", 0.5), ("fwd_bwd_s", 0.8), ("fwd_bwd_cpu_s", 0.4))}
    return {**raw, "engine": engine, "frozen_heads": heads, "frozen_mlp": mlp, "flops_per_step": flops,
            "grad_comm_bytes": [100, 100, 100], "frozen_param_bytes": 0}


def _record(name="converge", d_model=128):
    arms = {"full": _arm("converted", 0, 0, 1.0, 1000), "full_again": _arm("converted", 0, 0, 1.02, 1000),
            "heads_0.5": _arm("converted", 8, 0, 0.9, 950), "heads_mlp_0.5": _arm("converted", 8, 8, 0.8, 850),
            "unconverted": _arm("unconverted", 0, 0, 0.98, 1000)}
    return {"name": name, "command": "OMP_NUM_THREADS=1 deepspeed --num_gpus 1 benchmarks/freeze_speed.py --x",
            "note": "Other core busy.", "world_size": 1, "zero_stage": 2, "arch": "bert",
            "objective": "mlm, mask probability 0.4", "micro_batch": 32, "accum": 1, "tokens_per_step": 2048,
            "mlp_groups": 4, "rounds": 3, "steps_per_round": 3, "wall_s": 12.0,
            "model": {"n_layer": 4, "n_head": 4, "d_model": d_model, "d_ff": 4 * d_model, "seq_len": 64,
                      "vocab_size": 2048},
            "machine": {"cpu": "Test CPU (2 cores)", "accelerator": "cpu", "torch_threads": 1, "torch": "x",
                        "deepspeed": "y", "load_start": 2.0, "load_end": 2.5},
            "arms": arms}


def test_summarize_ratios_control_and_conversion():
    s = fs.summarize(_record())
    assert s["metrics"] == list(fs.METRICS)
    full = s["arms"]["full"]
    assert full["samples"] == 6 and full["step_s"] == pytest.approx(statistics.median([1.0, 1.2, 1.1, 0.9, 1.0, 1.3]))
    for arm, scale in (("full_again", 1.02), ("heads_0.5", 0.9), ("heads_mlp_0.5", 0.8), ("unconverted", 0.98)):
        r = s["arms"][arm]
        for k in fs.METRICS:
            assert r[k + "_ratio"] == pytest.approx(scale)
            assert r[k + "_round_range"] == pytest.approx((scale, scale))
    assert s["control"] == pytest.approx({k: 1.02 for k in fs.METRICS})
    assert s["converted_speed"] == pytest.approx({k: 0.98 for k in fs.METRICS})  # t(unconverted) / t(full)
    assert s["arms"]["heads_mlp_0.5"]["flops_ratio"] == pytest.approx(0.85)
    assert s["arms"]["unconverted"]["flops_ratio"] == 1.0
    assert s["arms"]["full"]["grad_comm_bytes"] == 100


def test_summarize_round_range_and_no_unconverted_arm():
    rec = _record()
    rec["arms"]["heads_0.5"]["step_s"] = [[0.5, 0.5, 0.5], [1.5, 1.5, 1.5]]  # per round vs full's 1.1 and 1.0
    del rec["arms"]["unconverted"]
    s = fs.summarize(rec)
    assert s["arms"]["heads_0.5"]["step_s_round_range"] == pytest.approx((0.5 / 1.1, 1.5 / 1.0))
    assert "converted_speed" not in s


def test_render_page_tables():
    text = fs.render_page([_record(), _record("d512", 512)])
    assert text.count("| arm | frozen heads | frozen MLP units | step wall s |") == 2
    assert "## converge: 4 layers × 4 heads, d 128, d_ff 512" in text and "## d512: 4 layers × 4 heads, d 512" in text
    assert "**6 samples per arm**" in text and "Other core busy." in text
    assert "| `heads_mlp_0.5` | 8 | 8 | 0.8400 | 0.800 | 0.80–0.80 | 0.4200 | 0.800 |" in text
    assert text.count("| 0.850 |") == 2  # FLOPs ratio column, one row per model
    assert "step wall **1.020**" in text and "fwd+bwd CPU **0.980**" in text
    assert "OMP_NUM_THREADS=1 deepspeed --num_gpus 1 benchmarks/freeze_speed.py --x" in text


def test_report_only_redraws_from_records(tmp_path):
    (tmp_path / "b.json").write_text(json.dumps(_record("d512", 512)))
    (tmp_path / "a.json").write_text(json.dumps(_record("converge", 128)))
    out = tmp_path / "page.md"
    fs.main(["--report_only", "--record", str(tmp_path / "a.json"), "--out", str(out)])
    text = out.read_text()
    assert text.index("## converge") < text.index("## d512")  # ordered by d_model
    assert f"`{tmp_path}/`" in text  # where the raw timings are
