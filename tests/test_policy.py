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


# ----------------------------------------------------------------------------------------------------------------------
# Opt-in variants of the rule; the defaults must stay the paper's rule, decision for decision.
# ----------------------------------------------------------------------------------------------------------------------
import math  # noqa: E402

from mat_ds.core.config import ConfigError, DEFAULTS, PRESETS  # noqa: E402
from mat_ds.core.mntk import lambda_max  # noqa: E402
from mat_ds.core.policy import FixedPolicy  # noqa: E402


class _PaperPolicy:
    """The MAT policy as it was before the opt-in variants (verbatim logic): the oracle for the defaults."""

    def __init__(self, alpha, beta, warmup, reactivate, scope, floor, groups):
        self.a, self.b, self.w, self.re, self.scope, self.floor = alpha, beta, warmup, reactivate, scope, floor
        self.groups = torch.tensor(groups)
        self.prev = self.delta1 = self.ratio = None
        self.frozen = torch.zeros(len(groups), dtype=torch.bool)

    def update(self, step, lam):
        if self.prev is not None:
            delta = (lam - self.prev).abs()
            if self.delta1 is None:
                self.delta1 = delta.clone()
            self.ratio = delta / self.delta1.clamp_min(1e-12)
        self.prev = lam.clone()
        if step < self.w:
            self.frozen = torch.zeros(len(lam), dtype=torch.bool)
            return self.frozen
        if self.scope == "layer":
            frozen = torch.zeros(len(lam), dtype=torch.bool)
            for g in self.groups.unique():
                sel = self.groups == g
                frozen[sel] = MATPolicy.modular_frozen(lam[sel], self.a)
        else:
            frozen = MATPolicy.modular_frozen(lam, self.a)
        if self.ratio is not None:
            frozen |= self.ratio < self.b
        if not self.re:
            frozen |= self.frozen
        self.frozen = MATPolicy.apply_floor(frozen, lam, self.floor)
        return self.frozen


def _recorded_sequence(refreshes=14, layers=3, heads=4, seed=5):
    """A λ history like the measured one: layer 0's heads ~100× the others', moving fast early and slowly later."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.rand(layers * heads, generator=gen, dtype=torch.float64) + 0.5
    base[:heads] *= 100.0
    seq, cur = [], base.clone()
    for r in range(refreshes):
        step_size = 0.5 if r == 0 else 0.05 / (1 + r)
        cur = cur * (1 + step_size * (torch.rand(cur.shape, generator=gen, dtype=torch.float64) - 0.3))
        seq.append(cur.clone())
    return seq, [l for l in range(layers) for _ in range(heads)]


@pytest.mark.parametrize("over", [{}, {"alpha": 0.3, "beta": 0.2}, {"threshold_scope": "layer", "beta": 0.3},
                                  {"min_active_fraction": 0.5, "alpha": 0.6}, {"reactivate": False, "beta": 0.25},
                                  {"preset": "paper"}, {"preset": "paper", "alpha": 0.1}])
def test_defaults_reproduce_the_papers_decisions_on_a_recorded_sequence(over):
    seq, groups = _recorded_sequence()
    cfg = MATConfig(warmup_steps=20, refresh_interval=10, **over)
    p = MATPolicy(cfg, len(groups), 3, groups)
    ref = _PaperPolicy(cfg.alpha, cfg.beta, 20, cfg.reactivate, cfg.threshold_scope, cfg.min_active_fraction, groups)
    masks = []
    for i, l in enumerate(seq):
        got, want = p.update(10 * i, l), ref.update(10 * i, l)
        assert torch.equal(got, want), (i, got, want)
        assert torch.equal(p.ratio, ref.ratio) if ref.ratio is not None else p.ratio is None
        masks.append(got)
    assert any(m.any() for m in masks) and len({tuple(m.tolist()) for m in masks}) >= 2  # it did decide things


def test_defaults_are_the_paper_preset_but_alpha_and_beta():
    cfg, paper = MATConfig(), MATConfig(preset="paper")
    for key, value in PRESETS["paper"].items():
        assert getattr(paper, key) == value, key
        if key not in ("alpha", "beta"):
            assert getattr(cfg, key) == value == DEFAULTS[key], key
    assert (cfg.alpha, cfg.beta) == (DEFAULTS["alpha"], DEFAULTS["beta"]) == (0.05, 0.0)
    assert (paper.alpha, paper.beta) == (0.1, 0.05)
    assert cfg.reactivate is DEFAULTS["reactivate"] is True


_L0_100X = lam(100, 200, 300, 400, 1, 2, 3, 4, 1.5, 2.5, 3.5, 4.5)  # layer 0 ~100× layers 1, 2
_GROUPS = [0] * 4 + [1] * 4 + [2] * 4


def _first_decision(n=12, groups=_GROUPS, values=_L0_100X, **kw):
    p = MATPolicy(MATConfig(warmup_steps=0, beta=0.0, **kw), n, 3, groups)
    return p.update(0, values)


def test_raw_threshold_picks_only_layer_0_and_layer_scores_keep_every_layer():
    train = ~_first_decision(alpha=0.1)
    assert train.tolist() == [True] * 4 + [False] * 8  # λ_α = 1 + 399·.1 = 40.9: only layer 0 trains
    # layer_z: z of log λ within each layer, then the α rule on z over all units: the same top heads in every layer.
    z = ~_first_decision(alpha=0.5, selection_score="layer_z")
    assert z.view(3, 4).any(1).all() and torch.equal(z.view(3, 4)[0], z.view(3, 4)[1])
    # top_k: 6 of 12 train; by layer z every layer keeps 2, by raw λ layer 0 takes 4 of the 6 places.
    topz = ~_first_decision(selection="top_k", active_budget=0.5, selection_score="layer_z")
    assert topz.view(3, 4).sum(1).tolist() == [2, 2, 2] and topz.view(3, 4)[:, 2:].all()
    topraw = ~_first_decision(selection="top_k", active_budget=0.5)
    assert topraw.tolist() == [True] * 4 + [False, False, False, True] * 2  # 400..100, then 4.5 and 4


def test_layer_z_score_is_the_within_layer_z_of_log_lambda():
    p = MATPolicy(MATConfig(selection_score="layer_z"), 12, 3, _GROUPS)
    z = p.score(_L0_100X)
    for g in range(3):
        v = _L0_100X[4 * g: 4 * g + 4].log()
        assert torch.allclose(z[4 * g: 4 * g + 4], (v - v.mean()) / v.std(unbiased=False))
    # a zero-gradient unit scores -inf and is left out of its layer's statistics; a flat layer scores 0
    z = p.score(lam(0, 1, 2, 4, 3, 3, 3, 3, 1, 1, 1, 1))
    v = lam(1, 2, 4).log()
    assert z[0] == -math.inf and torch.allclose(z[1:4], (v - v.mean()) / v.std(unbiased=False))
    assert z[4:].tolist() == [0.0] * 8
    # the α rule on z never freezes a finite unit in a flat field, always the -inf one
    assert MATPolicy.z_frozen(lam(-math.inf, 0, 0), 0.5).tolist() == [True, False, False]


def test_top_k_ties_lower_index_first_and_stopped_units_give_their_place():
    assert MATPolicy.top_k_frozen(lam(1, 1, 1, 1), torch.zeros(4, dtype=torch.bool), 0.5).tolist() == \
        [False, False, True, True]
    stopped = torch.tensor([False, True, False, False])
    assert MATPolicy.top_k_frozen(lam(1, 5, 3, 2), stopped, 0.5).tolist() == [True, True, False, False]
    assert MATPolicy.top_k_frozen(lam(1, 2), torch.ones(2, dtype=torch.bool), 1.0).tolist() == [True, True]


@pytest.mark.parametrize("kw", [dict(selection="top_k", active_budget=0.5), dict(alpha=0.5)])
def test_hysteresis_stops_a_flicker(kw):
    # two units whose λ swap order by 1 % at every refresh (the α rule: λ_α midway between them)
    seq = [lam(1.00, 1.01), lam(1.01, 1.00)] * 3
    def run(h):
        p = MATPolicy(MATConfig(warmup_steps=0, beta=0.0, hysteresis=h, **kw), 2)
        return [p.update(i, l).tolist() for i, l in enumerate(seq)]
    flicker, steady = run(0.0), run(0.05)
    assert flicker == [[True, False], [False, True]] * 3
    if "active_budget" in kw:
        assert steady == [[True, False]] * 6  # unit 1 keeps its place: 1.00·e^.05 > 1.01
    else:  # α rule: unit 1 stays above λ_α (1.00·e^.05 > 1.005); unit 0 rises above it and joins; nobody leaves
        assert steady == [[True, False]] + [[False, False]] * 5
    # a large λ change still wins over the margin
    p = MATPolicy(MATConfig(warmup_steps=0, beta=0.0, hysteresis=0.05, **kw), 2)
    p.update(0, lam(1.0, 1.01))
    assert p.update(1, lam(1.2, 1.0)).tolist() == [False, True]


def test_temporal_reference_after_warmup():
    # Δ from step 0 -> 10 (inside warm-up) is huge; the first change at/after warm-up (20 -> 30) is the reference.
    seq = [lam(1.0, 1.0), lam(11.0, 11.0), lam(11.5, 12.0), lam(11.6, 12.5), lam(11.61, 12.9)]
    kw = dict(selection="top_k", active_budget=1.0, beta=0.5, warmup_steps=30, refresh_interval=10)  # no modular rule
    first = MATPolicy(MATConfig(**kw), 2)
    late = MATPolicy(MATConfig(**kw, temporal_reference="after_warmup"), 2)
    out_first = [first.update(10 * i, l).tolist() for i, l in enumerate(seq)]
    out_late = [late.update(10 * i, l).tolist() for i, l in enumerate(seq)]
    assert first.delta1.tolist() == [10.0, 10.0] and out_first[3:] == [[True, True]] * 2  # Δ/10 << .5
    assert torch.allclose(late.delta1, lam(0.1, 0.5))  # the 20 -> 30 change
    assert out_late[3] == [False, False]  # ratio 1 at the reference itself
    assert out_late[4] == [True, False]  # unit 0: .01/.1 < .5; unit 1: .4/.5 >= .5


def test_relative_temporal_change():
    p = MATPolicy(MATConfig(selection="top_k", active_budget=1.0, beta=0.1, warmup_steps=0, temporal_change="relative"),
                  3)
    p.update(0, lam(10, 10, 0))
    assert p.update(1, lam(10.5, 12, 0)).tolist() == [True, False, True]  # 5 % < 10 %, 20 % >= 10 %, 0/0 -> 0
    assert torch.allclose(p.ratio, lam(0.05, 0.2, 0.0)) and p.delta1 is None


def test_temporal_patience_needs_m_consecutive_refreshes():
    # unit 0 is below β at refreshes 2, 3, then above at 4, then below at 5, 6, 7
    steps = [lam(1, 1), lam(2, 2), lam(2.01, 3), lam(2.02, 4), lam(3, 5), lam(3.01, 6), lam(3.02, 7), lam(3.03, 8)]
    def run(m):
        p = MATPolicy(MATConfig(selection="top_k", active_budget=1.0, beta=0.1, warmup_steps=0, temporal_patience=m),
                      2)
        return [p.update(i, l)[0].item() for i, l in enumerate(steps)]
    assert run(1) == [False, False, True, True, False, True, True, True]
    assert run(2) == [False, False, False, True, False, False, True, True]
    assert run(3) == [False] * 7 + [True]


def test_early_stop_is_permanent_and_reactivate_governs_only_the_modular_rule():
    steps = [lam(1, 1, 1), lam(2, 2, 2), lam(2.01, 3, 3), lam(4, 4, 4)]  # unit 0 converges at 2, moves again at 3
    kw = dict(alpha=0.0, beta=0.1, warmup_steps=0)
    plain = MATPolicy(MATConfig(**kw), 3)
    early = MATPolicy(MATConfig(**kw, early_stop=True), 3)
    assert [plain.update(i, l)[0].item() for i, l in enumerate(steps)] == [False, False, True, False]
    assert [early.update(i, l)[0].item() for i, l in enumerate(steps)] == [False, False, True, True]
    assert early.stopped.tolist() == [True, False, False]
    # stops happen only at post-warm-up decisions: a converged-looking unit in warm-up is not early-stopped
    w = MATPolicy(MATConfig(alpha=0.0, beta=0.1, warmup_steps=3, early_stop=True), 3)
    assert [w.update(i, l)[0].item() for i, l in enumerate(steps)] == [False] * 4 and not w.stopped.any()
    # top_k: an early-stopped unit never gets a place back, the budget goes to the others
    t = MATPolicy(MATConfig(beta=0.1, warmup_steps=0, early_stop=True, selection="top_k", active_budget=0.3), 3)
    assert [t.update(i, l).tolist() for i, l in enumerate(steps)][2:] == [[True, False, True], [True, False, True]]


def test_fixed_policy_masks_and_needs_no_probe():
    groups = [0, 0, 1, 1, 2, 2]
    cfg = MATConfig(policy="fixed", fixed_active_layers=[0], warmup_steps=30, refresh_interval=25)
    assert cfg.freezes and not cfg.needs_probe
    p = make_policy(cfg, 6, 3, groups)
    assert type(p) is FixedPolicy
    assert [s for s in range(80) if p.is_refresh_step(s)] == [0, 25, 30, 50, 75]
    assert not p.update(25, None).any()
    assert p.update(30, None).tolist() == [False, False, True, True, True, True]
    assert p.update(75, None).tolist() == [False, False, True, True, True, True]
    none = make_policy(MATConfig(policy="fixed", fixed_active_layers=[], warmup_steps=0), 6, 3, groups)
    assert none.update(0, None).all()
    two = make_policy(MATConfig(policy="fixed", fixed_active_layers=[2, 0], warmup_steps=0), 6, 3, groups)
    assert two.update(0, None).tolist() == [False, False, True, True, False, False]
    q = FixedPolicy(cfg, 6, 3, groups)
    q.load_state_dict(p.state_dict())
    assert torch.equal(q.frozen, p.frozen)
    cfg.check_model(3)
    with pytest.raises(ConfigError, match=r"fixed_active_layers \[3\] not in") as exc:
        MATConfig(policy="fixed", fixed_active_layers=[0, 3]).check_model(3)
    assert "\n" not in str(exc.value)
    with pytest.raises(ConfigError, match=r"fixed_active_layers \[0\] not in"):
        MATConfig(policy="fixed", fixed_active_layers=[0]).check_model(1, layers=[1, 3])


def _random_psd(n=6, units=4, seed=0, rank=3):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(units, n, rank, generator=gen, dtype=torch.float64)
    return g @ g.transpose(-1, -2) * torch.logspace(-3, 3, units, dtype=torch.float64).view(units, 1, 1)


def test_probe_normalize_cosine_and_trace_against_an_explicit_computation():
    grams = _random_psd()
    raw = lambda_max(grams)
    assert torch.equal(raw, lambda_max(grams, "none"))
    cos, tr = lambda_max(grams, "cosine"), lambda_max(grams, "trace")
    for u in range(grams.shape[0]):
        d = grams[u].diagonal().sqrt()
        c = grams[u] / torch.outer(d, d)
        assert math.isclose(float(cos[u]), float(torch.linalg.eigvalsh(c)[-1]), rel_tol=1e-10)
        assert math.isclose(float(tr[u]), float(torch.linalg.eigvalsh(grams[u])[-1] / grams[u].trace()),
                            rel_tol=1e-10)
    n = grams.shape[-1]
    assert ((cos >= 1 - 1e-9) & (cos <= n + 1e-9)).all() and ((tr >= 1 / n - 1e-9) & (tr <= 1 + 1e-9)).all()
    assert raw.max() / raw.min() > 1e4 and cos.max() / cos.min() < n  # the 10^6 scale spread is gone
    # scale-free: scaling a unit's Gram changes nothing
    assert torch.allclose(lambda_max(grams * 1e5, "cosine"), cos) and torch.allclose(lambda_max(grams * 1e5, "trace"), tr)


def test_probe_normalize_guards_zero_gradients():
    grams = _random_psd(n=4, units=2)
    grams[0] = 0.0  # a unit with zero gradient on every probe sample
    grams[1, 2, :] = grams[1, :, 2] = 0.0  # one sample with zero gradient in unit 1
    for mode in ("cosine", "trace"):
        out = lambda_max(grams, mode)
        assert torch.isfinite(out).all() and out[0] == 0.0
    keep = [0, 1, 3]
    sub = grams[1][keep][:, keep]
    d = sub.diagonal().sqrt()
    assert math.isclose(float(lambda_max(grams, "cosine")[1]), float(torch.linalg.eigvalsh(sub / torch.outer(d, d))[-1]),
                        rel_tol=1e-10)


_VARIANTS = [dict(temporal_patience=2, early_stop=True, temporal_reference="after_warmup", hysteresis=0.1),
             dict(selection="top_k", active_budget=0.4, selection_score="layer_z", hysteresis=0.2, early_stop=True),
             dict(temporal_change="relative", selection_score="layer_z", alpha=0.4, threshold_scope="layer",
                  temporal_patience=3, min_active_fraction=0.3)]


@pytest.mark.parametrize("kw", _VARIANTS)
def test_state_roundtrip_mid_run_continues_identically_with_the_variants(kw):
    seq, groups = _recorded_sequence(refreshes=16)
    cfg = MATConfig(warmup_steps=20, refresh_interval=10, beta=0.3, **kw)
    a = MATPolicy(cfg, len(groups), 3, groups)
    for i, l in enumerate(seq[:7]):
        a.update(10 * i, l)
    b = MATPolicy(cfg, len(groups), 3, groups)
    b.load_state_dict(a.state_dict())
    outs = []
    for i, l in enumerate(seq[7:], start=7):
        x, y = a.update(10 * i, l), b.update(10 * i, l)
        assert torch.equal(x, y) and torch.equal(a.below, b.below) and torch.equal(a.stopped, b.stopped)
        outs.append(x)
    assert any(o.any() for o in outs)


def test_old_checkpoint_without_the_new_keys_loads_with_defaults():
    a = MATPolicy(MATConfig(warmup_steps=0, alpha=0.3, beta=0.2), 3)
    for i, l in enumerate([lam(1, 2, 3), lam(1.5, 2.5, 4)]):
        a.update(i, l)
    state = a.state_dict()
    old = {k: v for k, v in state.items() if k not in ("below", "stopped")}
    b = MATPolicy(MATConfig(warmup_steps=0, alpha=0.3, beta=0.2, early_stop=True, temporal_patience=2), 3)
    b.load_state_dict(old)
    assert b.below.tolist() == [0, 0, 0] and not b.stopped.any() and torch.equal(b.frozen, a.frozen)
    assert torch.equal(b.delta1, a.delta1)


# Decisions of the MAT policy as committed before the opt-in variants (4658d35, mat_ds/core/policy.py run verbatim on
# _recorded_sequence(): 14 refreshes, 3 layers × 4 heads, layer 0 ~100×), one string per refresh, '1' = frozen. The
# paper's rule must keep reproducing them whatever DEFAULTS become: via the 'paper' preset, or with every rule key
# given explicitly. (Raw λ, global α: only layer 0's heads ever train.)
_PAPER_RECORDED = {
    (20, True): ["000000000000", "000000000000", "001011111111", "000011111111", "000011111111", "000011111111",
                 "000011111111", "100011111111", "000111111111", "100011111111", "100011111111", "010011111111",
                 "000011111111", "000011111111"],
    (20, False): ["000000000000", "000000000000", "001011111111", "001011111111", "001011111111", "001011111111",
                  "001011111111", "101011111111", "101111111111", "101111111111", "101111111111", "111111111111",
                  "111111111111", "111111111111"],
    (0, True): ["000011111111", "000011111111", "001011111111", "000011111111", "000011111111", "000011111111",
                "000011111111", "100011111111", "000111111111", "100011111111", "100011111111", "010011111111",
                "000011111111", "000011111111"],
}
_EXPLICIT_RECORDED = [
    (dict(alpha=0.3, beta=0.2, threshold_scope="layer", min_active_fraction=0.25, reactivate=True),
     ["000000000000", "000000000000", "111110000011", "011111100011", "111110100011", "111111000011", "111111010011",
      "011111110011", "011111110011", "111111010011", "011111110011", "011011110111", "011111110011",
      "011111110011"]),
    (dict(alpha=0.6, beta=0.3, threshold_scope="global", min_active_fraction=0.5, reactivate=False),
     ["000000000000", "000000000000"] + ["000010110111"] * 12),
]
_PAPER_NEW_KEYS = dict(selection="threshold", selection_score="lambda", hysteresis=0.0, probe_normalize="none",
                       temporal_change="absolute", temporal_reference="first", temporal_patience=1, early_stop=False)


def _masks(cfg):
    seq, groups = _recorded_sequence()
    p = MATPolicy(cfg, len(groups), 3, groups)
    return ["".join("1" if v else "0" for v in p.update(10 * i, l).tolist()) for i, l in enumerate(seq)]


@pytest.mark.parametrize("warmup,reactivate", list(_PAPER_RECORDED))
def test_paper_preset_reproduces_the_recorded_pre_variant_decisions(warmup, reactivate):
    want = _PAPER_RECORDED[(warmup, reactivate)]
    cfg = MATConfig.from_dict({"preset": "paper", "warmup_steps": warmup, "refresh_interval": 10,
                               "reactivate": reactivate})
    assert _masks(cfg) == want
    if DEFAULTS == {**DEFAULTS, **PRESETS["paper"], "reactivate": True}:  # today: the defaults are the paper's rule
        assert _masks(MATConfig.from_dict({"warmup_steps": warmup, "refresh_interval": 10,
                                           "reactivate": reactivate})) == want


@pytest.mark.parametrize("i", range(len(_EXPLICIT_RECORDED)))
def test_explicit_paper_keys_reproduce_the_recorded_pre_variant_decisions(i):
    kw, want = _EXPLICIT_RECORDED[i]
    assert _masks(MATConfig.from_dict({"warmup_steps": 20, "refresh_interval": 10, **kw, **_PAPER_NEW_KEYS})) == want


# -- refresh back-off ---------------------------------------------------------------------------------------------------
def _drive(cfg: MATConfig, lam_at, steps: int) -> list[int]:
    """Run the policy's own refresh schedule for ``steps`` steps; the refresh steps it chose."""
    pol = make_policy(cfg, 4)
    refreshed = []
    for step in range(steps):
        if pol.is_refresh_step(step):
            pol.update(step, lam_at(step))
            refreshed.append(step)
    return refreshed


def test_refresh_backoff_doubles_while_decisions_hold_and_resets_when_they_change():
    cfg = MATConfig(warmup_steps=10, refresh_interval=5, alpha=0.5, beta=0.0, refresh_backoff=2.0,
                    refresh_interval_max=40)
    stable = lambda step: torch.tensor([4.0, 3.0, 2.0, 1.0])  # noqa: E731  same decision at every refresh
    # warm-up at the base interval; the first post-warm-up decision (10) changes the mask, then 15 repeats it
    assert _drive(cfg, stable, 200) == [0, 5, 10, 15, 25, 45, 85, 125, 165]
    # a changed decision resets the gap to refresh_interval
    flip = lambda step: torch.tensor([4.0, 3.0, 2.0, 1.0]) if step < 45 else torch.tensor([1.0, 2.0, 3.0, 4.0])  # noqa
    assert _drive(cfg, flip, 100) == [0, 5, 10, 15, 25, 45, 50, 60, 80]
    # off (1.0): the fixed schedule, as before
    plain = MATConfig(warmup_steps=10, refresh_interval=5, alpha=0.5, beta=0.0)
    assert _drive(plain, stable, 30) == [0, 5, 10, 15, 20, 25]


def test_refresh_backoff_state_roundtrip_and_checks():
    cfg = MATConfig(warmup_steps=0, refresh_interval=5, alpha=0.5, beta=0.0, refresh_backoff=3.0)
    assert cfg.refresh_interval_max == 40
    a = make_policy(cfg, 4)
    lam = torch.tensor([4.0, 3.0, 2.0, 1.0])
    for step in (0, 5, 20):
        a.update(step, lam)
    b = make_policy(cfg, 4)
    b.load_state_dict(a.state_dict())
    assert (b.gap, b.next_refresh) == (a.gap, a.next_refresh) == (40, 60)
    with pytest.raises(ConfigError, match="refresh_backoff"):
        MATConfig(refresh_backoff=0.5)
    with pytest.raises(ConfigError, match="refresh_backoff"):
        MATConfig(policy="rand", rand_active_fraction=0.5, refresh_backoff=2.0)
    with pytest.raises(ConfigError, match="refresh_interval_max"):
        MATConfig(refresh_interval_max=100)
    with pytest.raises(ConfigError, match="refresh_interval_max"):
        MATConfig(refresh_interval=10, refresh_backoff=2.0, refresh_interval_max=5)
