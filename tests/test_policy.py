"""MAT modular/temporal policy and the baselines, on hand-made λmax sequences."""
import pytest
import torch

from mat_ds.core.config import MATConfig
from mat_ds.core.policy import MATPolicy, Policy, RandPolicy, make_policy


def lam(*v):
    return torch.tensor(v, dtype=torch.float64)


def test_modular_threshold_freezes_heads_at_or_below_lambda_alpha():
    # λ_α = 1 + (5 - 1) * 0.5 = 3: heads with λ <= 3 are frozen, > 3 train.
    frozen = MATPolicy.modular_frozen(lam(1, 2, 3, 4, 5), alpha=0.5)
    assert frozen.tolist() == [True, True, True, False, False]
    assert MATPolicy.modular_frozen(lam(1, 2, 3), alpha=0.0).tolist() == [True, False, False]
    assert MATPolicy.modular_frozen(lam(2, 2, 2), alpha=0.5).tolist() == [False] * 3  # no spread: nobody frozen


def test_warmup_then_modular_and_temporal():
    p = MATPolicy(MATConfig(alpha=0.25, beta=0.1, warmup_steps=20, refresh_interval=10), 4)
    assert p.update(0, lam(1.0, 2.0, 3.0, 4.0)).tolist() == [False] * 4
    assert p.update(10, lam(1.5, 3.0, 4.0, 6.0)).tolist() == [False] * 4  # Δ_1 = (.5, 1, 1, 2), still warm-up
    assert p.delta1.tolist() == [0.5, 1.0, 1.0, 2.0]
    # step 20: λ_α = 1.6 + (8 - 1.6)*.25 = 3.2 -> head 0 (1.6) and head 1 (3.05) modular-frozen;
    # Δ = (.1, .05, 1.0, 2.0), ratio = (.2, .05, 1, 1) -> head 1 converged as well (< β = .1).
    out = p.update(20, lam(1.6, 3.05, 5.0, 8.0))
    assert out.tolist() == [True, True, False, False]
    assert torch.allclose(p.ratio, lam(0.2, 0.05, 1.0, 1.0))
    # step 30: head 2 converges (Δ=.05/1 < .1); head 0 still below threshold.
    assert p.update(30, lam(2.0, 4.0, 5.05, 9.0)).tolist() == [True, False, True, False]


def test_reactivation_on_and_off():
    cfg = dict(alpha=0.5, beta=0.0, warmup_steps=0, refresh_interval=1)
    on, off = MATPolicy(MATConfig(**cfg, reactivate=True), 3), MATPolicy(MATConfig(**cfg, reactivate=False), 3)
    for p in (on, off):
        assert p.update(0, lam(1, 2, 10)).tolist() == [True, True, False]
    # head 0's λ rises above the threshold: it comes back only with reactivation.
    assert on.update(1, lam(9, 2, 10)).tolist() == [False, True, False]
    assert off.update(1, lam(9, 2, 10)).tolist() == [True, True, False]


def test_state_roundtrip_continues_identically():
    cfg = MATConfig(alpha=0.3, beta=0.2, warmup_steps=0, refresh_interval=1)
    a = MATPolicy(cfg, 3)
    seq = [lam(1, 2, 3), lam(1.5, 2.5, 4), lam(1.6, 2.4, 5), lam(1.61, 3, 6)]
    for i, l in enumerate(seq[:2]):
        a.update(i, l)
    b = MATPolicy(cfg, 3)
    b.load_state_dict(a.state_dict())
    for i, l in enumerate(seq[2:], start=2):
        assert torch.equal(a.update(i, l), b.update(i, l))
    assert a.history == b.history and len(a.history) == 4


def test_state_from_other_policy_or_size_is_rejected():
    a = MATPolicy(MATConfig(), 3)
    with pytest.raises(ValueError, match="policy"):
        RandPolicy(MATConfig(policy="rand", rand_active_fraction=0.5), 3).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="modules"):
        MATPolicy(MATConfig(), 4).load_state_dict(a.state_dict())


def test_rand_policy_fraction_and_reproducibility():
    cfg = MATConfig(policy="rand", rand_active_fraction=0.25, warmup_steps=10, seed=3)
    p, q = RandPolicy(cfg, 16), RandPolicy(cfg, 16)
    assert not p.update(0, None).any()
    a, b = p.update(10, None), q.update(10, None)
    assert int((~a).sum()) == 4 and torch.equal(a, b)
    assert not torch.equal(a, p.update(20, None))  # redrawn at each refresh


def test_make_policy_and_refresh_schedule():
    assert type(make_policy(MATConfig(policy="full"), 4)) is Policy
    assert type(make_policy(MATConfig(enabled=False), 4)) is Policy
    full = make_policy(MATConfig(policy="full"), 4)
    assert not any(full.is_refresh_step(s) for s in range(100))
    mat = make_policy(MATConfig(refresh_interval=25), 4)
    assert [s for s in range(100) if mat.is_refresh_step(s)] == [0, 25, 50, 75]


def test_multirate_slow_heads_train_every_kth_step():
    from mat_ds.core.policy import MultiratePolicy

    cfg = MATConfig(policy="multirate", multirate_k=3, multirate_slow_fraction=0.5, warmup_steps=2, seed=1)
    p = MultiratePolicy(cfg, 8)
    assert int(p.slow.sum()) == 4
    masks = [p.update(s, None) for s in range(9)]
    assert all(not m.any() for m in masks[:2])  # warm-up
    for s in range(2, 9):
        assert torch.equal(masks[s], torch.zeros(8, dtype=torch.bool) if s % 3 == 0 else p.slow)
    assert all(p.is_refresh_step(s) for s in range(9))


def test_raptr_paths_grow_keep_ends_and_vary():
    from mat_ds.core.policy import RaPTrPolicy

    cfg = MATConfig(policy="raptr", raptr_schedule=[[0, 2], [10, 4], [20, 6]], seed=0)
    p = RaPTrPolicy(cfg, 6 * 4, n_layers=6)
    for step, length in ((0, 2), (9, 2), (10, 4), (25, 6)):
        skipped = p.skipped_layers(step)
        assert int((~skipped).sum()) == length and not skipped[0] and not skipped[-1]
    assert len({tuple(p.skipped_layers(s).tolist()) for s in range(10, 20)}) > 1  # a new random path each step
    assert not p.update(3, None).any()  # heads are not frozen; whole layers are skipped instead


def test_raptr_and_multirate_config_checks():
    from mat_ds.core.config import ConfigError

    with pytest.raises(ConfigError, match="raptr_schedule"):
        MATConfig(policy="raptr")
    with pytest.raises(ConfigError, match="raptr_schedule"):
        MATConfig(policy="raptr", raptr_schedule=[[5, 2]])
    with pytest.raises(ConfigError, match="path length"):
        MATConfig(policy="raptr", raptr_schedule=[[0, 9]]).check_model(4)
    with pytest.raises(ConfigError, match="multirate_k"):
        MATConfig(policy="multirate", multirate_k=1)
    with pytest.raises(ConfigError, match="only used with"):
        MATConfig(policy="mat", multirate_k=3)


def test_layer_threshold_scope_keeps_each_layers_best_units():
    # Two layers of 3 units; layer 1's λ are all far below layer 0's.
    values = lam(10, 20, 30, 1, 2, 3)
    groups = [0, 0, 0, 1, 1, 1]
    glob = MATPolicy(MATConfig(alpha=0.5, beta=0.0, warmup_steps=0), 6, 2, groups)
    layer = MATPolicy(MATConfig(alpha=0.5, beta=0.0, warmup_steps=0, threshold_scope="layer"), 6, 2, groups)
    # global: λ_α = 1 + 29·0.5 = 15.5 -> unit 0 and all of layer 1 frozen.
    assert glob.update(0, values).tolist() == [True, False, False, True, True, True]
    # per layer: λ_α = 20 (layer 0) and 2 (layer 1) -> the lowest two of each layer frozen.
    assert layer.update(0, values).tolist() == [True, True, False, True, True, False]


def test_min_active_fraction_floor_reactivates_highest_lambda():
    cfg = dict(alpha=1.0, beta=0.0, warmup_steps=0)  # alpha 1: every unit is at or below λ_α -> all frozen
    assert MATPolicy(MATConfig(**cfg), 4).update(0, lam(4, 1, 3, 2)).tolist() == [True] * 4
    floor = MATPolicy(MATConfig(**cfg, min_active_fraction=0.5), 4)
    assert floor.update(0, lam(4, 1, 3, 2)).tolist() == [False, True, False, True]  # the two highest λ train
    # ceil: 0.3 of 4 units -> 2 must train; already-active units count toward the floor.
    assert MATPolicy.apply_floor(torch.tensor([True, False, True, True]), lam(1, 2, 3, 4), 0.3).tolist() == \
        [True, False, True, False]
    assert MATPolicy.apply_floor(torch.tensor([False, False, True]), lam(1, 2, 3), 0.5).tolist() == [False, False, True]


@pytest.mark.parametrize("block,match", [({"threshold_scope": "head"}, "threshold_scope"),
                                         ({"min_active_fraction": 1.5}, "min_active_fraction")])
def test_new_policy_options_are_checked(block, match):
    from mat_ds.core.config import ConfigError

    with pytest.raises(ConfigError, match=match):
        MATConfig(**block)
