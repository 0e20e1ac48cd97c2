"""Config validation: every bad value is a one-line ConfigError naming the key."""
import json

import pytest

from mat_ds.config import ConfigError, DataConfig, MATConfig, ModelConfig, RunConfig, load_deepspeed_config


@pytest.mark.parametrize("block,match", [
    ({"alpha": 1.5}, "mat.alpha"),
    ({"alpha": -0.1}, "mat.alpha"),
    ({"beta": 2}, "mat.beta"),
    ({"beta": "0.1"}, "mat.beta"),
    ({"policy": "greedy"}, "mat.policy"),
    ({"refresh_interval": 0}, "mat.refresh_interval"),
    ({"probe_samples": 1}, "mat.probe_samples"),
    ({"warmup_steps": -1}, "mat.warmup_steps"),
    ({"probe_output": "logits"}, "mat.probe_output"),
    ({"alhpa": 0.2}, "unknown key"),
    ({"policy": "rand"}, "rand_active_fraction"),
    ({"policy": "rand", "rand_active_fraction": 0}, "rand_active_fraction"),
    ({"rand_active_fraction": 0.5}, "only used with"),
    ({"reactivate": "yes"}, "mat.reactivate"),
])
def test_bad_mat_block(block, match):
    with pytest.raises(ConfigError, match=match) as exc:
        MATConfig.from_dict(block)
    assert "\n" not in str(exc.value)


def test_mat_block_types_are_the_core_ones_everywhere():
    """``MATConfig``/``ConfigError`` live in ``mat_ds.core.config``; ``mat_ds.config`` and ``mat_ds`` re-export them, so
    an ``except ConfigError`` written against any of the three catches what the core raises."""
    import mat_ds
    from mat_ds.core import config as core

    assert MATConfig is core.MATConfig is mat_ds.MATConfig
    assert ConfigError is core.ConfigError is mat_ds.ConfigError


def test_good_mat_block_and_defaults():
    cfg = MATConfig.from_dict({"alpha": 0.2, "beta": 0.0, "policy": "rand", "rand_active_fraction": 1})
    assert cfg.freezes and not cfg.needs_probe
    assert not MATConfig.from_dict(None).enabled
    assert MATConfig.from_dict({}).needs_probe


def test_model_data_run_checks():
    with pytest.raises(ConfigError, match="divisible"):
        ModelConfig(d_model=130, n_head=4)
    with pytest.raises(ConfigError, match="arch"):
        ModelConfig(arch="t5")
    assert ModelConfig(d_model=64).d_ff == 256
    with pytest.raises(ConfigError, match="val_fraction"):
        DataConfig(val_fraction=1.0)
    with pytest.raises(ConfigError, match="train_data"):
        DataConfig(train_data=" ")
    with pytest.raises(ConfigError, match="train_steps"):
        RunConfig(train_steps=0)
    with pytest.raises(ConfigError, match="patience_from needs patience"):
        RunConfig(patience_from=100, eval_interval=10)
    with pytest.raises(ConfigError, match="patience_from"):
        RunConfig(patience_from=-1, patience=2, eval_interval=10)
    assert RunConfig(patience_from=100, patience=2, eval_interval=10).patience_from == 100
    run = RunConfig(out_dir="runs/x/")
    assert run.save_dir == "runs/x/checkpoints" and run.run_name == "x"


def test_deepspeed_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_deepspeed_config(str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_deepspeed_config(str(bad))
    ok = tmp_path / "ok.json"
    ok.write_text(json.dumps({"mat": {"alpha": 0.3}}))
    assert load_deepspeed_config(str(ok))["mat"]["alpha"] == 0.3


def test_shipped_configs_are_valid():
    from pathlib import Path

    for path in sorted(Path(__file__).parents[1].glob("configs/*.json")):
        MATConfig.from_dict(load_deepspeed_config(str(path)).get("mat"))


def test_cli_flags_roundtrip():
    import argparse

    from mat_ds.config import add_cli_arguments, from_cli

    parser = argparse.ArgumentParser()
    add_cli_arguments(parser)
    model, data, run = from_cli(parser.parse_args(["--n_layer", "6", "--comm_stats", "--train_data", "x.txt"]))
    assert model.n_layer == 6 and run.comm_stats is True and data.train_data == "x.txt"
    _, _, run = from_cli(parser.parse_args(["--comm_stats", "false"]))
    assert run.comm_stats is False


def test_model_block_in_the_json_is_overridden_by_flags():
    import argparse

    from mat_ds.config import add_cli_arguments, from_cli

    parser = argparse.ArgumentParser()
    add_cli_arguments(parser)
    ds = {"model": {"moe_num_experts": 4, "moe_ep_size": 2, "n_layer": 6}}
    model, _, run = from_cli(parser.parse_args([]), ds)
    assert (model.moe_num_experts, model.moe_ep_size, model.n_layer, run.seed) == (4, 2, 6, RunConfig().seed)
    model, _, _ = from_cli(parser.parse_args(["--n_layer", "4", "--moe_ep_size", "1"]), ds)
    assert (model.n_layer, model.moe_ep_size, model.moe_num_experts) == (4, 1, 4)
    with pytest.raises(ConfigError, match="unknown key.*moe_experts"):
        from_cli(parser.parse_args([]), {"model": {"moe_experts": 4}})
    with pytest.raises(ConfigError, match="moe_ep_size=3 must divide"):
        from_cli(parser.parse_args([]), {"model": {"moe_num_experts": 4, "moe_ep_size": 3}})


def test_entry_point_help_renders():
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).parents[1]
    out = subprocess.run([sys.executable, "launch/pretrain.py", "--help"], cwd=repo, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "--flops_budget" in out.stdout and "80% <mask>" in out.stdout


@pytest.mark.parametrize("block,match", [
    ({"probe_normalize": "l2"}, "mat.probe_normalize"),
    ({"selection": "layer"}, "mat.selection"),
    ({"selection_score": "z"}, "mat.selection_score"),
    ({"selection": "top_k"}, "needs mat.active_budget"),
    ({"selection": "top_k", "active_budget": 0}, "mat.active_budget"),
    ({"selection": "top_k", "active_budget": 1.5}, "mat.active_budget"),
    ({"active_budget": 0.5}, "only used with mat.selection='top_k'"),
    ({"selection": "top_k", "active_budget": 0.5, "alpha": 0.1}, "mat.alpha is only used with"),
    ({"selection": "top_k", "active_budget": 0.5, "threshold_scope": "layer"}, "mat.threshold_scope is only used"),
    ({"hysteresis": -0.1}, "mat.hysteresis"),
    ({"hysteresis": "0.1"}, "mat.hysteresis"),
    ({"hysteresis": float("inf")}, "mat.hysteresis"),
    ({"temporal_reference": "last"}, "mat.temporal_reference"),
    ({"temporal_change": "log"}, "mat.temporal_change"),
    ({"temporal_change": "relative", "temporal_reference": "first"}, "mat.temporal_reference is only used"),
    ({"temporal_patience": 0}, "mat.temporal_patience"),
    ({"temporal_patience": 1.5}, "mat.temporal_patience"),
    ({"early_stop": 1}, "mat.early_stop"),
    ({"policy": "rand", "rand_active_fraction": 0.5, "selection": "top_k"}, "only used with mat.policy='mat'"),
    ({"policy": "full", "probe_normalize": "cosine"}, "mat.probe_normalize is only used with mat.policy='mat'"),
    ({"policy": "rand", "rand_active_fraction": 0.5, "preset": "paper"}, "mat.preset is only used"),
    ({"preset": "fast"}, "mat.preset"),
    ({"preset": "paper", "alpha": 0.05}, "mat.alpha=0.05 conflicts with mat.preset='paper'"),
    ({"preset": "paper", "probe_normalize": "cosine"}, "mat.probe_normalize='cosine' conflicts"),
    ({"preset": "paper", "early_stop": 0}, "mat.early_stop=0 conflicts"),
    ({"policy": "fixed"}, "fixed_active_layers"),
    ({"policy": "fixed", "fixed_active_layers": [0, 0]}, "fixed_active_layers"),
    ({"policy": "fixed", "fixed_active_layers": [-1]}, "fixed_active_layers"),
    ({"policy": "fixed", "fixed_active_layers": 0}, "fixed_active_layers"),
    ({"fixed_active_layers": [0]}, "only used with mat.policy='fixed'"),
    ({"policy": "fixed", "fixed_active_layers": [0], "hysteresis": 0.1}, "only used with mat.policy='mat'"),
])
def test_bad_rule_keys_are_one_line_errors(block, match):
    with pytest.raises(ConfigError, match=match) as exc:
        MATConfig.from_dict(block)
    assert "\n" not in str(exc.value)


def test_rule_keys_defaults_presets_and_irrelevant_keys():
    from mat_ds.core.config import DEFAULTS, PRESETS

    default, paper = MATConfig.from_dict({}), MATConfig.from_dict({"preset": "paper"})
    for key in DEFAULTS:
        assert getattr(default, key) == DEFAULTS[key], key
        assert getattr(paper, key) == PRESETS["paper"].get(key, DEFAULTS[key]), key
    assert set(PRESETS["paper"]) <= set(DEFAULTS)
    assert [k for k in PRESETS["paper"] if PRESETS["paper"][k] != DEFAULTS[k]] == ["alpha", "beta"]
    # a key equal to the preset's value is fine; keys the preset does not set take DEFAULTS (or the user's value)
    cfg = MATConfig.from_dict({"preset": "paper", "beta": 0.05, "reactivate": False, "warmup_steps": 7})
    assert (cfg.beta, cfg.reactivate, cfg.warmup_steps) == (0.05, False, 7)
    # keys the chosen rule does not read are left None (so the resolved config round-trips through its dict)
    top = MATConfig.from_dict({"selection": "top_k", "active_budget": 0.25, "temporal_change": "relative"})
    assert top.alpha is None and top.threshold_scope is None and top.temporal_reference is None
    import dataclasses

    for c in (default, paper, top, MATConfig.from_dict({"policy": "fixed", "fixed_active_layers": [0]}),
              MATConfig.from_dict({"policy": "rand", "rand_active_fraction": 0.5, "alpha": 0.2})):
        assert MATConfig(**dataclasses.asdict(c)) == c
    # other policies: the old rule keys are still accepted (and ignored); the new ones stay unset
    rand = MATConfig.from_dict({"policy": "rand", "rand_active_fraction": 0.5})
    assert rand.alpha == DEFAULTS["alpha"] and rand.selection is None and rand.probe_normalize is None
    fixed = MATConfig.from_dict({"policy": "fixed", "fixed_active_layers": []})
    assert fixed.freezes and not fixed.needs_probe and "fixed_active_layers=[]" in fixed.describe()
    assert "probe_normalize='none'" in default.describe() and "\n" not in default.describe()


@pytest.mark.parametrize("key,value", [("alpha", 0.1), ("beta", 0.05), ("reactivate", True),
                                       ("threshold_scope", "global"), ("min_active_fraction", 0.0),
                                       ("selection", "threshold"), ("early_stop", False)])
def test_fixed_policy_takes_no_rule_keys(key, value):
    # 'fixed' reads no λ rule: every DEFAULTS key given with it is a one-line error (even at its default value) ...
    with pytest.raises(ConfigError, match=f"mat.{key} is only used with mat.policy='mat'") as exc:
        MATConfig.from_dict({"policy": "fixed", "fixed_active_layers": [0], key: value})
    assert "\n" not in str(exc.value)


def test_fixed_policy_leaves_the_rule_keys_unset_and_round_trips():
    import dataclasses

    from mat_ds.core.config import DEFAULTS

    fixed = MATConfig.from_dict({"policy": "fixed", "fixed_active_layers": [0], "warmup_steps": 5})
    assert all(getattr(fixed, key) is None for key in DEFAULTS)  # ... so its resolved dict builds it again
    assert MATConfig(**dataclasses.asdict(fixed)) == fixed
    # the older policies keep accepting (and ignoring) the older rule keys: their configs predate the distinction
    assert MATConfig.from_dict({"policy": "rand", "rand_active_fraction": 0.5, "alpha": 0.2, "beta": 0.1}).alpha == 0.2


def test_shipped_configs_run_the_defaults():
    """``make train`` and the configs/ MAT blocks use MATConfig's α/β (the converge studies' winning cell, not the
    paper's: docs/results.md) and a refresh back-off; ``"preset": "paper"`` is the paper's rule."""
    from pathlib import Path

    from mat_ds.core.config import DEFAULTS

    for path in sorted(Path(__file__).parents[1].glob("configs/*.json")):
        block = json.loads(path.read_text())["mat"]
        if block.get("policy") != "mat":
            continue
        cfg = MATConfig.from_dict(block)
        assert (cfg.alpha, cfg.beta) == (DEFAULTS["alpha"], DEFAULTS["beta"]) == (0.05, 0.0), path.name
        assert cfg.refresh_backoff == 2.0 and cfg.refresh_interval_max == 8 * cfg.refresh_interval, path.name
