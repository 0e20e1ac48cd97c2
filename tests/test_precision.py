"""MAT in real pretraining settings, on 2 real ranks (tests/scripts/precision_check.py): precision {fp32, bf16, fp16}
x ZeRO {0, 1, 2, 3} x activation checkpointing {off, torch non-reentrant, DeepSpeed's, HF's}, gradient accumulation 2.

Per runnable cell: frozen heads keep their weights, fp32 master and Adam fragments bit-identical on every rank while
every other head trains; no weight gradient is computed for them, also in the recomputed backward of a checkpointed
block, and gradient bytes drop by exactly their share; λmax is the explicit Jacobian's (fp32: rel err < 1e-4) and
identical with checkpointing on and off; bf16 and fp16 track fp32 (per-step |Δloss| <= LOSS_TOL); MAT's own refreshes
under gradient accumulation change the frozen set only at optimizer-step boundaries; an overflowing step is skipped by
ZeRO (1-3; and by the bf16/fp16 wrapper without ZeRO) without touching any head. Refusals: ZeRO-Offload with freezing,
a one-line ConfigError; policy "full" with ZeRO-Offload trains.

fp16 follows the hardware, decided by the query mat_ds itself makes (``get_accelerator().is_fp16_supported()``,
``tests/hardware.py``): where it answers yes (CUDA; a CPU whose oneDNN has fp16, e.g. AVX512-FP16/AMX Xeons) the fp16
cells exist and run like the bf16 ones (with dynamic loss scaling: no step skipped but the forced overflow), and the
errors case's fp16 configs must be ACCEPTED; where it answers no, no fp16 cell is generated and the fp16 configs must
be one-line ConfigErrors. The launched ranks ask the same query and report it; a test asserts they agree with this
process. Which branch ran is in the test ids and in the terminal summary (tests/conftest.py).

MLP units (``own+mlp`` / ``bert+mlp``: the same models with their dense MLPs converted, ``mlp_groups`` 2, ``"modules":
["heads", "mlp"]``): MLP units 1 (L0G1) and 2 (L1G0) are frozen with the heads, and every check above holds for them
too, as strictly (bit-identical frozen state, every other unit moves, no frozen unit's weight gradient per head-wise
layer also when recomputed, the byte drop over all frozen units, λmax vs ``explicit_unit_grams``, the MLP mask constant
within a step, untouched by a skipped step).

Default suite: ONE launch (ZeRO-2 row, every precision, every checkpointing kind, plus the error cases, plus two MLP
cells: ``MLP_DEFAULT``). Slow (``-m slow``): the ZeRO-0, ZeRO-1 and ZeRO-3 rows (one launch each) and the MLP rows
``mlp_zero0`` .. ``mlp_zero3`` (one launch each; ``-m slow -k mlp`` runs just those). A launch is self-contained:
comparisons between cells (checkpointing vs off, bf16/fp16 vs fp32) use the twin of the SAME launch, so the ones for a
default MLP cell whose twin only an MLP row runs are made in that (slow) row, which runs the cell again.
"""
from __future__ import annotations

from collections import defaultdict

import pytest

from tests.hardware import fp16_branch, fp16_supported
from tests.launcher import REPO, launch_cases

SCRIPT = REPO / "tests" / "scripts" / "precision_check.py"
LAM_TOL = 1e-4  # fp32: fast-path probe vs explicit Jacobian (measured ~1e-7)
BF16_LAM_TOL = 0.05  # bf16 probe vs the fp32 probe of the same weights (measured <= 6.5e-3): loosely bounded
FP16_LAM_TOL = 0.05  # fp16 probe vs the fp32 probe of the same weights (measured <= 1.1e-3 on a CPU with fp16)
# per-step |mean loss bf16 - mean loss fp32| over the 8 fixed-mask steps; measured <= 0.0048 (own Transformer) and
# <= 0.0202 (HF BERT, whose loss is itself computed in bf16: spacing 0.016-0.03 at loss 2-8), ZeRO 1-3; fp16 (a CPU
# with fp16, dynamic loss scale 2^8): <= 0.0002 (own) and <= 0.0015 (HF BERT), ZeRO 1-3
LOSS_TOL = 0.05
# bf16 WITHOUT ZeRO: DeepSpeed's own DDP_BFLOAT16 path (bf16 gradient accumulation, FP16_UnfusedOptimizer) drifts from
# fp32 with no MAT at all (tests/scripts/ds_bf16_zero0.py, plain MLP: 0.345 over 8 steps vs 0.0048 with ZeRO-1);
# mat_ds's ZeRO-0 cells measured 0.090 (own) and 0.097 after 6 of 8 steps (HF BERT), final step < 0.15; fp16 takes the
# same FP16_UnfusedOptimizer path without ZeRO: 0.107 (own) and 0.100 (HF BERT)
LOSS_TOL_ZERO0 = 0.15
AC_LOSS_TOL = 1e-5  # fp32: per-step |loss with checkpointing - loss without| (measured: exactly 0)
FROZEN_HEADS = (1, 4)
ACCUM = 2
POLICY_START, POLICY_STEPS = 8, 6  # steps 0-1 everything trains, 2-7 a fixed frozen set, then MAT's policy
POLICY_REFRESHES = [8, 10, 12]  # refresh_interval 2


FP16 = fp16_supported()  # this machine's answer, the query mat_ds.initialize makes (tests/hardware.py)
PRECS = ("fp32", "bf16") + (("fp16",) if FP16 else ())
FP16_INITIAL_SCALE = 2.0 ** 8  # precision_check.FP16_BLOCK


def _row(stage: int, mlp: str = "") -> list[str]:
    precs = PRECS
    return [f"{p}:{stage}:{m}" for p in precs
            for m in (f"own{mlp}:off", f"own{mlp}:torch", f"own{mlp}:ds", f"bert{mlp}:hf")]


MLP_DEFAULT = ["fp32:2:own+mlp:off", "bf16:3:own+mlp:torch"]  # the default suite's MLP cells (in the ZeRO-2 launch)
GROUPS = {"zero2": _row(2) + ["errors"] + MLP_DEFAULT, "zero0": _row(0), "zero1": _row(1), "zero3": _row(3),
          **{f"mlp_zero{stage}": _row(stage, "+mlp") for stage in range(4)}}
SLOW = {"zero0", "zero1", "zero3", "mlp_zero0", "mlp_zero1", "mlp_zero2", "mlp_zero3"}
OWNER: dict[str, str] = {}  # spec -> the launch whose row the per-cell tests check (the first listing it)
for _group, _specs in GROUPS.items():
    for _spec in _specs:
        OWNER.setdefault(_spec, _group)
FROZEN_UNITS_MLP = ["L0H1", "L1H0", "L0G1", "L1G0"]  # precision_check FROZEN_HEADS + FROZEN_MLP
TRAINED_UNITS_MLP = ["L0H0", "L0H2", "L0H3", "L1H1", "L1H2", "L1H3", "L0G0", "L1G1"]
WGRAD_FROZEN_BY_TAG = {"heads:0": ["(True, False, True, True)"], "heads:1": ["(False, True, True, True)"],
                       "mlp:0": ["(True, False)"], "mlp:1": ["(False, True)"]}
# gradient element size on the wire (comms logger), every stage (ZeRO-1 under bf16 = DeepSpeed's BF16_Optimizer too)
GRAD_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
PARAM_DTYPE = {"fp32": "torch.float32", "bf16": "torch.bfloat16", "fp16": "torch.float16"}
LAM_TOL_OF = {"bf16": BF16_LAM_TOL, "fp16": FP16_LAM_TOL}
_results: dict[str, dict[str, dict]] = {}


def _group_of(spec: str) -> str:
    return OWNER[spec]


def _pair_group(spec: str, twin: str) -> str | None:
    """The first launch that runs both ``spec`` and its ``twin`` (cross-cell comparisons stay within one launch)."""
    return next((g for g, specs in GROUPS.items() if spec in specs and twin in specs), None)


def _mlp(r: dict) -> bool:
    return r["model"].endswith("+mlp")


_failed: dict[str, str] = {}  # group -> why its launch failed: reported by every test of the group, launched ONCE


def group_rows(group: str) -> dict[str, dict]:
    if group in _failed:
        raise AssertionError(_failed[group])
    if group not in _results:
        pytest.importorskip("transformers")
        try:
            rows = launch_cases(SCRIPT, GROUPS[group], "PRECISION_CHECK", lambda r: r["spec"], timeout=900)
        except AssertionError as exc:
            _failed[group] = str(exc)
            raise
        _results[group] = rows
        print(fp16_branch())
        for r in _results[group].values():
            _print_row(r, _results[group])
    return _results[group]


def results(spec: str, group: str | None = None) -> dict:
    return group_rows(group or _group_of(spec))[spec]


def pair(spec: str, twin: str) -> tuple[dict, dict]:
    """(row of spec, row of twin) from the first launch that runs both."""
    rows = group_rows(_pair_group(spec, twin))
    return rows[spec], rows[twin]


def _fp32_twin(r: dict, group: dict) -> dict | None:
    return group.get("fp32:" + r["spec"].split(":", 1)[1]) if r["prec"] != "fp32" else None


def _print_row(r: dict, group: dict) -> None:
    if r["spec"] == "errors":
        print("errors:", r["refused"], r["fp16_accepted"], r["cpu_adam"], r["offload_full_runs"])
        return
    twin = _fp32_twin(r, group)
    dloss = max(abs(a - b) for a, b in zip(r["losses"], twin["losses"])) if twin else float("nan")
    g = r["grad_bytes_per_rank"][0]
    print(f"{r['spec']:18s} frozen dW {r['frozen_weight_drift']} state {max(r['frozen_state_drift'].values())} | "
          f"lam err step0 {r['step0_lam_rel_err_oracle']:.1e} trained {r['trained_lam_rel_err_oracle']:.1e} "
          f"(ac/noac {r['trained_ac_vs_noac_max_abs']}) | max|dloss| vs fp32 {dloss:.4f} | grad B drop {g['drop']} | "
          f"refreshes {r['policy_refresh_log']} | overflow {r.get('overflow', {}).get('skipped_steps_delta')} | "
          f"lam err vs fp32 probe {r['step0_lam_rel_err_fp32_probe']:.1e}/{r['trained_lam_rel_err_fp32_probe']:.1e} | "
          f"skipped {r['skipped_steps_per_step']} before overflow {r['skipped_steps_before_overflow']} | "
          f"scale {sorted(set(map(str, r['loss_scale_per_step'])))} -> overflow "
          f"{r.get('overflow', {}).get('loss_scale_before')}->{r.get('overflow', {}).get('loss_scale_after')} | "
          f"{r['seconds']:.1f}s")
    if _mlp(r):
        m = r["frozen_mlp_drift_per_rank"]
        print(f"{'':18s} mlp: frozen dW {max(x['weights'] for x in m)} state "
              f"{max(max(x[k] for k in ('fp32', 'exp_avg', 'exp_avg_sq')) for x in m)} | lam err step0 "
              f"{r['step0_mlp_lam_rel_err_oracle']:.1e} trained {r['trained_mlp_lam_rel_err_oracle']:.1e} (ac/noac "
              f"{r['trained_mlp_ac_vs_noac_max_abs']}) vs fp32 probe {r['step0_mlp_lam_rel_err_fp32_probe']:.1e}/"
              f"{r['trained_mlp_lam_rel_err_fp32_probe']:.1e} | grad B drop {g['drop']} expected "
              f"{g['expected_drop_fp32'] * GRAD_BYTES[r['prec']] // 4} (mlp share "
              f"{g['expected_drop_fp32_mlp'] * GRAD_BYTES[r['prec']] // 4}) | wgrad frozen units computed "
              f"{r['wgrad_frozen_units_computed']} (mlp {r['wgrad_frozen_mlp_units_computed']}) | trained mlp min "
              f"change {r['trained_mlp_min_change']:.3g}")


CELLS = [pytest.param(spec, marks=[pytest.mark.slow] if group in SLOW else [], id=spec)
         for spec, group in OWNER.items() if spec != "errors"]


def _off_twin(spec: str) -> str:
    return spec.rsplit(":", 1)[0] + ":off"


def _pair_param(spec: str, twin: str):
    """A cross-cell test of ``spec`` against ``twin``: slow unless the launch that runs both is the default one."""
    return pytest.param(spec, marks=[pytest.mark.slow] if _pair_group(spec, twin) in SLOW else [], id=spec)


@pytest.mark.parametrize("spec", CELLS)
def test_frozen_heads_weights_master_and_adam_state_bit_identical(spec):
    r = results(spec)
    assert r["param_dtype"] == PARAM_DTYPE[r["prec"]]
    assert r["requires_grad_off"]
    assert r["frozen_weight_drift"] == 0.0
    assert r["frozen_state_drift"] == {"fp32": 0.0, "exp_avg": 0.0, "exp_avg_sq": 0.0}
    assert r["frozen_change_api"] == 0.0
    for rank in r["frozen_drift_per_rank"]:
        assert (rank["weights"], rank["fp32"], rank["exp_avg"], rank["exp_avg_sq"]) == (0.0, 0.0, 0.0, 0.0)
    frag = [rank["fragment_numel"] for rank in r["frozen_drift_per_rank"]]
    if r["stage"] in (1, 2):  # the partitions cover every frozen element exactly once across ranks
        assert sum(frag) == r["frozen_numel_global"]
    elif r["stage"] == 0:
        assert frag == [r["frozen_numel_global"]] * r["world"]
    else:  # ZeRO-3: each rank holds a (padded) share of every parameter
        assert all(f > 0 for f in frag) and sum(frag) >= r["frozen_numel_global"]
    assert r["trained_unmoved"] == [] and r["trained_min_change"] > 0.0  # (b) every other head trained
    if _mlp(r):  # the frozen MLP units alone: the same, per rank; and every other unit (heads and MLP) trained
        assert r["frozen_units"] == r["frozen_units_api"] == FROZEN_UNITS_MLP
        assert r["frozen_mlp_mask"] == [False, True, True, False]
        for rank in r["frozen_mlp_drift_per_rank"]:
            assert (rank["weights"], rank["fp32"], rank["exp_avg"], rank["exp_avg_sq"]) == (0.0, 0.0, 0.0, 0.0)
        frag = [rank["fragment_numel"] for rank in r["frozen_mlp_drift_per_rank"]]
        assert 0 < r["frozen_mlp_numel_global"] < r["frozen_numel_global"]
        if r["stage"] in (1, 2):
            assert sum(frag) == r["frozen_mlp_numel_global"]
        elif r["stage"] == 0:
            assert frag == [r["frozen_mlp_numel_global"]] * r["world"]
        else:
            assert all(f > 0 for f in frag) and sum(frag) >= r["frozen_mlp_numel_global"]
        assert r["trained_units"] == TRAINED_UNITS_MLP and r["trained_mlp_min_change"] > 0.0


@pytest.mark.parametrize("spec", CELLS)
def test_no_weight_gradient_for_frozen_heads_also_when_recomputed(spec):
    r = results(spec)
    linears, recompute = r["headwise_linears"], 1 if r["ac"] == "off" else 2
    # the checkpointed blocks really ran their forward twice per micro-batch (once more in backward) ...
    assert r["headwise_forwards_per_step"] == [recompute * ACCUM * linears] * len(r["losses"])
    # ... and each head-wise backward computed weight gradients exactly for the trainable units
    assert r["wgrad_calls_per_step"] == [ACCUM * linears] * len(r["losses"])
    assert r["wgrad_patterns_full"] == (["(True, True)"] if _mlp(r) else []) + ["(True, True, True, True)"]
    assert r["wgrad_patterns_frozen"] == r["wgrad_patterns_expected_frozen"]
    assert r["wgrad_frozen_computed"] == 0
    assert r["frozen_grads_none"]
    elem = GRAD_BYTES[r["prec"]]
    for rank in r["grad_bytes_per_rank"]:
        assert len(set(rank["frozen"])) == 1, rank  # steady per step
        assert rank["drop"] == rank["expected_drop_fp32"] * elem // 4 > 0, rank
    if _mlp(r):
        # per head-wise layer (heads:l, mlp:l): its calls, and the units whose weight gradient it computed, against
        # THAT layer's frozen units (the MLP layers' 2-unit patterns among them)
        assert r["wgrad_layer_tags"] == sorted(WGRAD_FROZEN_BY_TAG) and r["wgrad_untagged_calls"] == 0
        by_tag = r["headwise_linears_by_tag"]
        assert sum(by_tag.values()) == linears and all(by_tag[t] > 0 for t in WGRAD_FROZEN_BY_TAG)
        for tag, calls in r["wgrad_calls_by_tag_per_step"].items():
            assert calls == [ACCUM * by_tag[tag]] * len(r["losses"]), (tag, calls)
        assert r["wgrad_patterns_full_by_tag"] == {t: ["(True, True)" if t.startswith("mlp") else
                                                       "(True, True, True, True)"] for t in WGRAD_FROZEN_BY_TAG}
        assert r["wgrad_patterns_expected_frozen_by_tag"] == WGRAD_FROZEN_BY_TAG
        assert r["wgrad_patterns_frozen_by_tag"] == WGRAD_FROZEN_BY_TAG
        assert r["wgrad_frozen_units_computed"] == 0 and r["wgrad_frozen_mlp_units_computed"] == 0
        assert r["wgrad_trainable_units_skipped"] == 0
        for rank in r["grad_bytes_per_rank"]:  # the frozen MLP units' share is in the drop
            assert 0 < rank["expected_drop_fp32_mlp"] < rank["expected_drop_fp32"], rank


@pytest.mark.parametrize("spec", CELLS)
def test_lambda_max_exact_and_unchanged_by_checkpointing(spec):
    r = results(spec)
    assert r["engine_refresh_at_step0"]
    assert r["trained_ac_vs_noac_max_abs"] == 0.0  # the probe runs in eval mode: no recompute, the same Grams
    keys = ["step0", "trained"]
    if _mlp(r):  # the MLP units' Grams: from the engine's own step-0 refresh too, and the same with/without ac
        assert r["engine_step0_mlp_grams"] and r["trained_mlp_ac_vs_noac_max_abs"] == 0.0
        assert len(r["step0_mlp_lam"]) == len(r["trained_mlp_lam"]) == 4  # 2 layers x mlp_groups 2
        keys += ["step0_mlp", "trained_mlp"]
    for when in keys:
        assert r[f"{when}_ref_probe_lam_rel_err_oracle"] < LAM_TOL  # the fp32 probe of the same weights is exact
        if r["prec"] == "fp32":
            assert r[f"{when}_lam_rel_err_oracle"] < LAM_TOL, (when, r[f"{when}_lam_rel_err_oracle"])
            assert r[f"{when}_gram_rel_err_oracle"] < LAM_TOL, (when, r[f"{when}_gram_rel_err_oracle"])
        else:
            tol = LAM_TOL_OF[r["prec"]]
            assert r[f"{when}_lam_rel_err_fp32_probe"] < tol, (when, r[f"{when}_lam_rel_err_fp32_probe"])
    # same init, same λ as the cell without checkpointing (where this launch runs it; else the next test does it)
    if r["ac"] != "off" and r["model"].startswith("own") and _off_twin(spec) in GROUPS[_group_of(spec)]:
        _same_lambda_as_without_checkpointing(r, _results[_group_of(spec)][_off_twin(spec)])


def _same_lambda_as_without_checkpointing(r: dict, off: dict) -> None:
    for kind in ("", "_mlp") if _mlp(r) else ("",):
        assert r[f"step0{kind}_lam"] == off[f"step0{kind}_lam"], kind
        if r["prec"] == "fp32":
            assert max(abs(a - b) / b for a, b in zip(r[f"trained{kind}_lam"], off[f"trained{kind}_lam"])) < LAM_TOL


@pytest.mark.parametrize("spec", [_pair_param(s, _off_twin(s)) for s, g in OWNER.items()
                                  if ":own+mlp:" in s and not s.endswith(":off") and _off_twin(s) not in GROUPS[g]])
def test_mlp_lambda_unchanged_by_checkpointing_vs_the_off_cell(spec):
    """The step0/trained λ comparison with the cell without checkpointing for MLP cells whose launch does not run
    that cell (a default MLP cell): made in the MLP row that runs both."""
    r, off = pair(spec, _off_twin(spec))
    _same_lambda_as_without_checkpointing(r, off)


def _low_precision_losses_track_fp32(spec):
    half, fp32 = pair(spec, "fp32:" + spec.split(":", 1)[1])
    diffs = [abs(a - b) for a, b in zip(half["losses"], fp32["losses"])]
    tol = LOSS_TOL_ZERO0 if half["stage"] == 0 else LOSS_TOL
    assert len(diffs) == POLICY_START and max(diffs) <= tol, diffs
    assert fp32["losses"][-1] < fp32["losses"][0] and half["losses"][-1] < half["losses"][0]


def _fp32_pair_param(spec: str):
    return _pair_param(spec, "fp32:" + spec.split(":", 1)[1])


@pytest.mark.parametrize("spec", [_fp32_pair_param(c.values[0]) for c in CELLS if c.values[0].startswith("bf16")])
def test_bf16_losses_track_fp32(spec):
    _low_precision_losses_track_fp32(spec)


# fp16-only tests exist only where the accelerator has fp16 (not an empty, skipped parametrization elsewhere); where it
# has none, no fp16 cell is generated and test_unsupported_configs_are_one_line_config_errors[fp16_*] exist instead.
if FP16:
    FP16_CELLS = [c for c in CELLS if c.values[0].startswith("fp16")]

    @pytest.mark.parametrize("spec", [_fp32_pair_param(c.values[0]) for c in FP16_CELLS])
    def test_fp16_losses_track_fp32(spec):
        _low_precision_losses_track_fp32(spec)

    @pytest.mark.parametrize("spec", FP16_CELLS)
    def test_fp16_dynamic_loss_scaling_skips_only_the_forced_overflow(spec):
        """DeepSpeed's dynamic loss scaling from 2^8: no step of the run overflows on its own (so the fixed-mask,
        policy and fp32-tracking phases above are the same optimizer steps as fp32's), and the forced overflow is
        skipped once. On it ZeRO 1-3's DynamicLossScaler spends one hysteresis count (scale kept); without ZeRO
        DeepSpeed's FP16_UnfusedOptimizer has no hysteresis and halves the scale."""
        r = results(spec)
        assert r["skipped_steps_per_step"] == [0] * POLICY_START and r["skipped_steps_before_overflow"] == 0
        assert r["loss_scale_per_step"] == [FP16_INITIAL_SCALE] * POLICY_START
        o = r["overflow"]
        assert o["loss_scale_before"] == FP16_INITIAL_SCALE
        expected = FP16_INITIAL_SCALE / 2 if r["stage"] == 0 else FP16_INITIAL_SCALE
        assert o["loss_scale_after"] == expected and o["next_loss_scale"] == expected, o


@pytest.mark.parametrize("spec", [c for c in CELLS if ":own:" in c.values[0] and ":off" not in c.values[0]
                                  and c.values[0].startswith("fp32")]
                         + [_pair_param(c.values[0], _off_twin(c.values[0])) for c in CELLS
                            if ":own+mlp:" in c.values[0] and ":off" not in c.values[0]
                            and c.values[0].startswith("fp32")])
def test_fp32_checkpointing_does_not_change_the_run(spec):
    r, off = pair(spec, _off_twin(spec))
    assert max(abs(a - b) for a, b in zip(r["losses"], off["losses"])) <= AC_LOSS_TOL


@pytest.mark.parametrize("spec", CELLS)
def test_policy_decisions_change_only_at_optimizer_step_boundaries(spec):
    r = results(spec)
    assert r["policy_refresh_log"] == [[s, 0] for s in POLICY_REFRESHES]  # refreshed at micro-step 0 only
    _mask_changes_only_at_refreshes(r["policy_hook_log"])
    if _mlp(r):  # the MLP units' mask, recorded at the same forwards
        assert [e[:2] for e in r["policy_hook_log_mlp"]] == [e[:2] for e in r["policy_hook_log"]]
        _mask_changes_only_at_refreshes(r["policy_hook_log_mlp"])
    assert r["policy_frozen_drift"] == 0.0


def _mask_changes_only_at_refreshes(hook_log: list) -> None:
    by_step = defaultdict(list)
    for step, micro, mask, requires_grad_off in hook_log:
        assert mask == requires_grad_off  # what MAT says is frozen is what autograd sees
        by_step[step].append((micro, tuple(mask)))
    assert sorted(by_step) == list(range(POLICY_START, POLICY_START + POLICY_STEPS))
    masks = []
    for step, entries in sorted(by_step.items()):
        assert [m for m, _ in entries] == list(range(ACCUM)), entries  # one forward per micro-step
        assert len({mask for _, mask in entries}) == 1, (step, entries)  # constant within the optimizer step
        masks.append(entries[0][1])
    changes = [s for s, a, b in zip(sorted(by_step)[1:], masks, masks[1:]) if a != b]
    assert set(changes) <= set(POLICY_REFRESHES)  # a new decision only where MAT refreshed


@pytest.mark.parametrize("spec", [c for c in CELLS if not c.values[0].startswith("fp32:0:")])
def test_overflow_step_is_skipped_without_touching_heads(spec):
    o = results(spec)["overflow"]
    assert o["loss_finite_before_inf"] and o["frozen_heads"] > 0
    assert o["skipped_steps_delta"] == 1
    assert o["all_heads_drift"] == {"weights": 0.0, "fp32": 0.0, "exp_avg": 0.0, "exp_avg_sq": 0.0}
    assert o["adam_step_after"] == o["adam_step_before"]  # the optimizer did not step
    # DeepSpeed counts a skipped step in global_steps; MAT's clock (global_steps - skipped_steps) does not
    assert o["global_steps_delta"] == 1 and o["mat_step_delta"] == 0
    assert o["next_skipped_steps_delta"] == 1 and o["next_step_moved"] > 0.0 and o["next_step_frozen_change"] == 0.0
    if _mlp(results(spec)):  # no MLP unit touched either
        assert o["all_mlp_drift"] == {"weights": 0.0, "fp32": 0.0, "exp_avg": 0.0, "exp_avg_sq": 0.0}


def _errors() -> dict:
    return results("errors")


BRANCH = "fp16_supported" if FP16 else "fp16_unsupported"


@pytest.mark.parametrize("group", [pytest.param(g, marks=[pytest.mark.slow] if g in SLOW else [], id=f"{g}-{BRANCH}")
                                   for g in GROUPS])
def test_ranks_answer_the_fp16_query_as_this_process(group):
    """The branch this module generated its cells from is what every launched rank's accelerator says."""
    rows = group_rows(group)
    for spec, r in rows.items():
        assert r["fp16_supported_ranks"] == [FP16, FP16], (spec, r["fp16_supported_ranks"], FP16)
    assert {r["prec"] for r in rows.values() if "prec" in r} == set(PRECS)


FP16_CONFIGS = ["fp16_zero0", "fp16_zero1", "fp16_zero2"]
OFFLOAD_CONFIGS = ["offload_optimizer_zero2", "offload_optimizer_zero3", "offload_param_zero3"]


@pytest.mark.parametrize("name", OFFLOAD_CONFIGS + ([] if FP16 else FP16_CONFIGS))
def test_unsupported_configs_are_one_line_config_errors(name):
    msg = _errors()["refused"][name]
    assert msg and "\n" not in msg and not msg.startswith(("NOT A ConfigError", "NOT REFUSED")), msg
    if name.startswith("fp16"):
        assert "fp16 is not supported" in msg and "bf16" in msg
    else:
        assert name.rsplit("_", 1)[0] in msg and "policy 'full'" in msg


if FP16:  # where fp16 is unsupported these configs are refused instead (the test above)
    @pytest.mark.parametrize("name", FP16_CONFIGS)
    def test_fp16_configs_are_accepted_where_the_accelerator_has_fp16(name):
        errors = _errors()
        assert errors["refused"][name] == "NOT REFUSED", errors["refused"][name]
        acc = errors["fp16_accepted"][name]
        assert acc["param_dtype"] == "torch.float16" and acc["stage"] == int(name[-1]), acc


@pytest.mark.parametrize("name", ["full_offload_optimizer_zero2", "full_offload_param_optimizer_zero3"])
def test_policy_full_runs_with_zero_offload(name):
    errors = _errors()
    run = errors["offload_full_runs"][name]
    assert "error" not in run, run
    expected = "DeepSpeedCPUAdam" if errors["cpu_adam"]["available"] else "AdamW"
    assert run["inner_optimizer"] == expected, (run, errors["cpu_adam"])
    assert run["losses"][1] < run["losses"][0] and run["moved"] > 0.0 and run["frozen_heads"] == 0
    assert run["freezer_refusal"] and "\n" not in run["freezer_refusal"] and "offload" in run["freezer_refusal"].lower()
