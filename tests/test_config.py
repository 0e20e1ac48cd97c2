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
