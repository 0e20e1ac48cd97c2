"""The ``"mat"`` block of the DeepSpeed JSON config (``MATConfig``) and the one-line ``ConfigError``.

DeepSpeed accepts a custom top-level block and hands it back via ``engine.config["mat"]``; ``mat_ds.initialize`` reads
it from there. Every field has a docstring (its ``help`` metadata) and is validated in ``__post_init__``: a bad value is
a ``ConfigError`` whose message is one line and says what to change.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence


class ConfigError(ValueError):
    """A user-facing configuration problem. The message is one line and says what to change."""


def _help(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    _check(value in choices, f"{name}={value!r} is not one of {', '.join(map(repr, choices))}")


def _check_int(name: str, value: Any, lo: int) -> None:
    _check(isinstance(value, int) and not isinstance(value, bool) and value >= lo,
           f"{name}={value!r} must be an integer >= {lo}")


def _check_unit(name: str, value: Any, lo_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (0 < value <= 1 if lo_open else 0 <= value <= 1)
    _check(ok, f"{name}={value!r} must be in {'(0, 1]' if lo_open else '[0, 1]'}")


# ----------------------------------------------------------------------------------------------------------------------
# The "mat" block of the DeepSpeed config
# ----------------------------------------------------------------------------------------------------------------------
POLICIES = ("mat", "rand", "full", "multirate", "raptr", "fixed")
PROBE_OUTPUTS = ("loss", "logit_projection", "logit_sum")
MODULE_KINDS = ("heads", "mlp", "experts")
PROBE_NORMALIZE = ("none", "cosine", "trace")
SELECTIONS = ("threshold", "top_k")
SELECTION_SCORES = ("lambda", "layer_z")
TEMPORAL_REFERENCES = ("first", "after_warmup")
TEMPORAL_CHANGES = ("absolute", "relative")

# THE defaults of the policy's rule keys: the value a key takes when neither the user nor a ``preset`` gives it. This
# dict is the one place to change them. They are the paper's rule (PRESETS["paper"]) except alpha 0.05 and beta 0
# (no temporal rule), the cell that beat full training in the converge studies (docs/results.md: paired over seeds on a
# third of WikiText-2 and on Penn Treebank) where the paper's alpha 0.1 / beta 0.05 was a coin toss; "preset":
# "paper" restores the paper's rule exactly.
DEFAULTS: dict[str, Any] = {
    "alpha": 0.05, "beta": 0.0, "reactivate": True, "threshold_scope": "global", "min_active_fraction": 0.0,
    "selection": "threshold", "selection_score": "lambda", "active_budget": None, "hysteresis": 0.0,
    "probe_normalize": "none", "temporal_reference": "first", "temporal_change": "absolute",
    "temporal_patience": 1, "early_stop": False,
}
# Named rules: a preset sets these keys; giving one of them with another value too is a one-line error.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"alpha": 0.1, "beta": 0.05, "threshold_scope": "global", "min_active_fraction": 0.0,
              "selection": "threshold", "selection_score": "lambda", "hysteresis": 0.0, "probe_normalize": "none",
              "temporal_reference": "first", "temporal_change": "absolute", "temporal_patience": 1,
              "early_stop": False},
}
# Keys that only the 'mat' policy reads (given with another policy: a one-line error). The older rule keys (alpha,
# beta, reactivate, threshold_scope, min_active_fraction) stay accepted, and ignored, with the older policies (rand,
# full, multirate, raptr: their configs predate the distinction); with 'fixed' every DEFAULTS key is an error.
_MAT_ONLY = ("selection", "selection_score", "active_budget", "hysteresis", "probe_normalize", "temporal_reference",
             "temporal_change", "temporal_patience", "early_stop")


def _d(key: str) -> str:
    return f" Default {DEFAULTS[key]!r} (core/config.py DEFAULTS)."


@dataclass
class MATConfig:
    """Modular Adaptive Training, read from the ``"mat"`` block of the DeepSpeed JSON config.

    Choices the paper leaves open, and what we picked (all configurable):

    * scalar output f_i of sample i for the mNTK: its mean training loss (``probe_output="loss"``), so Θ^l is the Gram
      of per-sample loss gradients of module l; ``"logit_projection"`` uses <r, logits_i> with a fixed random unit
      vector r per position (a one-sample sketch of the output-space NTK trace);
    * probe: ``probe_samples`` fixed training sequences with a fixed MLM mask, drawn once from ``seed``, so λmax
      changes only when the weights change;
    * refresh: λmax recomputed every ``refresh_interval`` optimizer steps (step 0 included); decisions hold in between;
    * warm-up: nothing is frozen before ``warmup_steps`` (λmax is still measured, to build the Δ history);
    * re-activation: with ``reactivate`` the frozen set is recomputed from scratch at each refresh, so a frozen head
      whose λmax rises above the threshold (or starts moving again) trains again; without it freezing is permanent;
    * threshold scope: λ_α over all units of a kind in the model (``threshold_scope="global"``, the paper's reading)
      or within each layer (``"layer"``: every layer keeps its own best units, so no layer is frozen wholesale);
    * floor: the paper lets every unit freeze (``min_active_fraction=0``); a floor keeps at least that share of each
      kind's units training, the highest-λmax frozen ones re-activated first.

    Opt-in variants of the rule (``probe_normalize``, ``selection``/``selection_score``/``active_budget``,
    ``hysteresis``, ``temporal_reference``/``temporal_change``/``temporal_patience``/``early_stop``) and ``preset``:
    the rule keys take, in order, the user's value, the preset's, ``DEFAULTS`` (the one place the defaults live; today
    the paper's rule). A key the chosen rule does not read is left None, and giving it is a one-line error.
    """

    enabled: bool = _help("Turn MAT (or the chosen baseline policy) on.", default=True)
    policy: str = _help("'mat' (α/β policy); baselines: 'full' (no freezing), 'rand' (random heads at "
                        "rand_active_fraction), 'multirate' (slow heads updated every multirate_k steps), 'raptr' "
                        "(random path of layers, growing in stages), 'fixed' (probe-free control: only the units of "
                        "fixed_active_layers train after warm-up).", default="mat")
    preset: Optional[str] = _help(
        "Policy 'mat' only: a named rule that sets its keys (PRESETS in core/config.py): 'paper' = alpha 0.1, beta "
        "0.05, threshold selection on raw λ (global, no floor, no hysteresis), probe_normalize 'none', temporal "
        "reference 'first', 'absolute' change, patience 1, no early_stop. Keys the preset does not set take "
        "DEFAULTS; a key given together with a preset that sets it to ANOTHER value is an error (the preset names "
        "an exact rule: drop the preset to change it).", default=None)
    alpha: Optional[float] = _help("Modular threshold (selection 'threshold'): units with score > "
                                   "s_min + (s_max-s_min)·alpha train. In [0, 1]." + _d("alpha"), default=None)
    beta: Optional[float] = _help("Temporal threshold: a unit whose change (Δ_t/Δ_ref, or the relative change) is "
                                  "below beta has converged and is frozen; 0 = no temporal rule. In [0, 1]."
                                  + _d("beta"), default=None)
    warmup_steps: int = _help("Optimizer steps of full training before any head is frozen.", default=50)
    refresh_interval: int = _help("Optimizer steps between λmax refreshes (and policy decisions).", default=25)
    refresh_backoff: float = _help(
        "Policy 'mat' only: after warm-up, a refresh whose frozen set equals the previous refresh's multiplies the "
        "gap to the next one by this factor (rounded, at most refresh_interval_max); a changed decision resets it to "
        "refresh_interval. 1 = every refresh_interval steps (the paper). >= 1. With a temporal rule (beta > 0), Δ_t "
        "then spans the longer gap.", default=1.0)
    refresh_interval_max: Optional[int] = _help(
        "With refresh_backoff > 1: the longest gap between refreshes (optimizer steps); default 8·refresh_interval.",
        default=None)
    probe_samples: int = _help("n, the number of probe sequences for the n×n mNTK Gram (>= 2).", default=16)
    probe_output: str = _help("Scalar per-sample output f_i for the mNTK: 'loss' (mean cross-entropy over the "
                              "sample's targets), 'logit_projection' (<r_t, logits_t>, fixed random unit r_t) or "
                              "'logit_sum' (sum of the target positions' logits).", default="loss")
    probe_gram: str = _help("How a layer's per-unit Gram is formed: 'materialized' (per-sample gradients, "
                            "n·d_in·d_out numbers), 'ghost' (activation Grams, 2·(n·T)² numbers) or 'auto' (per layer, "
                            "the cheaper in FLOPs within probe_memory_mb).", default="auto")
    probe_memory_mb: int = _help("Memory bound for one layer's Gram work in a refresh (MiB); a probe that cannot fit "
                                 "is a one-line error at start-up.", default=2048)
    probe_normalize: Optional[str] = _help(
        "Policy 'mat' only: what 'λ' is, from each unit's final (all-reduced) n×n Gram Θ: 'none' (λmax(Θ), the "
        "paper), 'cosine' (λmax of Θ_ij/sqrt(Θ_ii·Θ_jj), in [1, n]: how aligned the unit's per-sample gradients "
        "are, scale-free; a sample with zero gradient gets a zero row, a unit with none gets 0) or 'trace' "
        "(λmax(Θ)/trace(Θ), in [1/n, 1]; 0 for a zero Gram). Logged λ (mat/lambda_max/*) is this value."
        + _d("probe_normalize"), default=None)
    reactivate: Optional[bool] = _help("Recompute the frozen set at every refresh (frozen heads can come back)."
                                       + _d("reactivate"), default=None)
    selection: Optional[str] = _help(
        "Policy 'mat' only: the modular rule on the units' scores (selection_score), per kind: 'threshold' (the "
        "paper's α rule, score > s_min + (s_max-s_min)·alpha trains, over the kind or per layer with "
        "threshold_scope) or 'top_k' (a budget: the ceil(active_budget·units) highest-score units that the "
        "temporal rule did not stop train; ties: lower index first)." + _d("selection"), default=None)
    selection_score: Optional[str] = _help(
        "Policy 'mat' only: the score the modular rule ranks: 'lambda' (λ itself, the paper; hysteresis acts on "
        "log λ) or 'layer_z' (z-score of log λ within each layer's units of the kind, population std; a layer "
        "without spread scores 0; λ <= 0 scores -inf and is left out of its layer's mean/std and of the α rule's "
        "min/max): scale-free across layers, so a layer with 100× larger λ does not take all places."
        + _d("selection_score"), default=None)
    active_budget: Optional[float] = _help(
        "Selection 'top_k' only (and required there): share of each kind's units that train after warm-up, "
        "ceil(active_budget·units). In (0, 1].", default=None)
    hysteresis: Optional[float] = _help(
        "Policy 'mat' only: a unit that the previous post-warm-up decision left training gets its score raised by "
        "this much when thresholded or ranked (log λ for score 'lambda', i.e. λ·e^h; z units for 'layer_z'), so "
        "decisions do not flicker between refreshes. The threshold itself is computed from the unraised scores. "
        ">= 0." + _d("hysteresis"), default=None)
    threshold_scope: Optional[str] = _help(
        "Selection 'threshold' only: where s_α = s_min + (s_max-s_min)·alpha is computed: 'global' (over all units "
        "of a kind, the paper) or 'layer' (over each layer's units separately)." + _d("threshold_scope"),
        default=None)
    min_active_fraction: Optional[float] = _help(
        "Policy 'mat': at least ceil(fraction·units) units of each kind keep training after warm-up (the "
        "highest-score frozen ones are re-activated; applied last, over every other rule). 0 = all may freeze (the "
        "paper). In [0, 1]." + _d("min_active_fraction"), default=None)
    temporal_reference: Optional[str] = _help(
        "Policy 'mat', temporal_change 'absolute' only: the reference Δ_ref of Δ_t/Δ_ref: 'first' (the unit's "
        "first measured change, step 0 -> first refresh, the paper) or 'after_warmup' (the first change measured "
        "at a refresh at or after warmup_steps, outside the LR warm-up transient)." + _d("temporal_reference"),
        default=None)
    temporal_change: Optional[str] = _help(
        "Policy 'mat' only: the temporal rule's measure of change between consecutive refreshes: 'absolute' "
        "(|λ_t-λ_{t-1}|/Δ_ref, the paper) or 'relative' (|λ_t-λ_{t-1}|/λ_{t-1}, no reference), compared with "
        "beta." + _d("temporal_change"), default=None)
    temporal_patience: Optional[int] = _help(
        "Policy 'mat' only: m >= 1 consecutive measured refreshes (warm-up ones included) with change below beta "
        "before the temporal rule stops a unit; 1 = the paper." + _d("temporal_patience"), default=None)
    early_stop: Optional[bool] = _help(
        "Policy 'mat' only: a unit the temporal rule stopped (at a post-warm-up decision) stays frozen for the rest "
        "of the run, whatever reactivate says (reactivate governs the modular rule). The min_active_fraction floor "
        "still applies." + _d("early_stop"), default=None)
    rand_active_fraction: Optional[float] = _help(
        "Policy 'rand' only: fraction of heads trained after warm-up, chosen uniformly at random at each refresh.",
        default=None)
    multirate_k: Optional[int] = _help("Policy 'multirate' only: slow heads train on every k-th step (default 4).",
                                       default=None)
    multirate_slow_fraction: Optional[float] = _help(
        "Policy 'multirate' only: share of heads (seeded random choice, fixed for the run) that are slow (default 0.5).",
        default=None)
    raptr_schedule: Optional[list] = _help(
        "Policy 'raptr' only: [[start_step, path_length], ...], first start 0. Each step trains a random path of "
        "path_length layers (first and last layer always in it); skipped layers are the identity.", default=None)
    fixed_active_layers: Optional[list] = _help(
        "Policy 'fixed' only (and required there): transformer layer indices whose units (of the kinds in modules) "
        "keep training after warmup_steps; every other unit is frozen from warm-up on, for good. No probe runs. "
        "[0] = all but layer 0's attention frozen; [] = all attention frozen. The λ rule's keys (DEFAULTS: alpha, "
        "beta, reactivate, selection, ...) are errors with it and stay unset.", default=None)
    modules: list = _help("Module kinds the policy selects: 'heads' (attention heads), 'mlp' (groups of a dense MLP "
                          "block's hidden channels, mlp_groups per layer; opt-in: the MLPs are converted only when it "
                          "is listed) and/or 'experts' (MoE experts; ignored for a dense model). Each kind gets its "
                          "own threshold: λ scales differ by kind.",
                          default_factory=lambda: ["heads", "experts"])
    mlp_groups: int = _help("With 'mlp' in modules: MLP units per layer. Unit g owns hidden channels [g·F/G, (g+1)·F/G) "
                            "(rows of the up/gate projections with their bias entries, input columns of the down "
                            "projection; the down projection's bias is shared and always trains); 1 = the whole MLP "
                            "block is one unit. Must divide the MLP width F.", default=1)
    seed: int = _help("Seed for the probe set and the random baselines.", default=0)
    log_heatmap_interval: int = _help("Optimizer steps between per-head λmax tables/heatmaps in W&B (0 = never).",
                                      default=100)

    def __post_init__(self) -> None:
        _check_choice("mat.policy", self.policy, POLICIES)
        self._resolve_rule_keys()
        _check_choice("mat.probe_output", self.probe_output, PROBE_OUTPUTS)
        _check_choice("mat.probe_gram", self.probe_gram, ("auto", "materialized", "ghost"))
        _check_int("mat.probe_memory_mb", self.probe_memory_mb, 1)
        if self.alpha is not None:  # None: selection 'top_k' (no α rule), policy 'fixed'
            _check_unit("mat.alpha", self.alpha)
        if self.beta is not None:  # None: policy 'fixed' (no rule keys)
            _check_unit("mat.beta", self.beta)
        _check_int("mat.warmup_steps", self.warmup_steps, 0)
        _check_int("mat.refresh_interval", self.refresh_interval, 1)
        _check(isinstance(self.refresh_backoff, (int, float)) and not isinstance(self.refresh_backoff, bool)
               and math.isfinite(self.refresh_backoff) and self.refresh_backoff >= 1,
               f"mat.refresh_backoff={self.refresh_backoff!r} must be a number >= 1")
        if self.refresh_backoff > 1:
            _check(self.policy == "mat", f"mat.refresh_backoff is only used with mat.policy='mat' (got "
                                         f"{self.policy!r}); remove it")
            if self.refresh_interval_max is None:
                self.refresh_interval_max = 8 * self.refresh_interval
            _check_int("mat.refresh_interval_max", self.refresh_interval_max, self.refresh_interval)
        else:
            _check(self.refresh_interval_max is None, "mat.refresh_interval_max is only used with mat.refresh_backoff "
                                                      "> 1; remove it")
        _check_int("mat.probe_samples", self.probe_samples, 2)
        _check_int("mat.seed", self.seed, 0)
        _check_int("mat.log_heatmap_interval", self.log_heatmap_interval, 0)
        _check_int("mat.mlp_groups", self.mlp_groups, 1)
        _check(isinstance(self.enabled, bool), f"mat.enabled={self.enabled!r} must be true or false")
        _check(isinstance(self.modules, list) and len(self.modules) > 0
               and all(m in MODULE_KINDS for m in self.modules) and len(set(self.modules)) == len(self.modules),
               f"mat.modules={self.modules!r} must be a non-empty list of distinct kinds from {list(MODULE_KINDS)}")
        if self.reactivate is not None:  # None: policy 'fixed'
            _check(isinstance(self.reactivate, bool), f"mat.reactivate={self.reactivate!r} must be true or false")
        if self.threshold_scope is not None:  # None: selection 'top_k', policy 'fixed'
            _check_choice("mat.threshold_scope", self.threshold_scope, ("global", "layer"))
        if self.min_active_fraction is not None:  # None: policy 'fixed'
            _check_unit("mat.min_active_fraction", self.min_active_fraction)
        if self.policy == "mat":
            _check_choice("mat.selection", self.selection, SELECTIONS)
            _check_choice("mat.selection_score", self.selection_score, SELECTION_SCORES)
            _check_choice("mat.probe_normalize", self.probe_normalize, PROBE_NORMALIZE)
            _check_choice("mat.temporal_change", self.temporal_change, TEMPORAL_CHANGES)
            if self.temporal_reference is not None:  # None: temporal_change 'relative' (no reference)
                _check_choice("mat.temporal_reference", self.temporal_reference, TEMPORAL_REFERENCES)
            _check_int("mat.temporal_patience", self.temporal_patience, 1)
            _check(isinstance(self.early_stop, bool), f"mat.early_stop={self.early_stop!r} must be true or false")
            _check(isinstance(self.hysteresis, (int, float)) and not isinstance(self.hysteresis, bool)
                   and math.isfinite(self.hysteresis) and self.hysteresis >= 0,
                   f"mat.hysteresis={self.hysteresis!r} must be a number >= 0")
            if self.selection == "top_k":
                _check(self.active_budget is not None, "mat.selection='top_k' needs mat.active_budget in (0, 1]")
                _check_unit("mat.active_budget", self.active_budget, lo_open=True)
        if self.policy == "rand":
            _check(self.rand_active_fraction is not None, "mat.policy='rand' needs mat.rand_active_fraction in (0, 1]")
            _check_unit("mat.rand_active_fraction", self.rand_active_fraction, lo_open=True)
        elif self.rand_active_fraction is not None:
            raise ConfigError("mat.rand_active_fraction is only used with mat.policy='rand'; remove it")
        if self.policy == "multirate":
            self.multirate_k = 4 if self.multirate_k is None else self.multirate_k
            self.multirate_slow_fraction = 0.5 if self.multirate_slow_fraction is None else self.multirate_slow_fraction
            _check_int("mat.multirate_k", self.multirate_k, 2)
            _check_unit("mat.multirate_slow_fraction", self.multirate_slow_fraction, lo_open=True)
        elif self.multirate_k is not None or self.multirate_slow_fraction is not None:
            raise ConfigError("mat.multirate_* keys are only used with mat.policy='multirate'; remove them")
        if self.policy == "raptr":
            _check_raptr_schedule(self.raptr_schedule)
        elif self.raptr_schedule is not None:
            raise ConfigError("mat.raptr_schedule is only used with mat.policy='raptr'; remove it")
        if self.policy == "fixed":
            layers = self.fixed_active_layers
            _check(isinstance(layers, list)
                   and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in layers)
                   and len(set(layers)) == len(layers),
                   "mat.policy='fixed' needs mat.fixed_active_layers, a list of distinct layer indices >= 0 "
                   "(e.g. [0], or [] to freeze every unit)")
        elif self.fixed_active_layers is not None:
            raise ConfigError("mat.fixed_active_layers is only used with mat.policy='fixed'; remove it")

    def _resolve_rule_keys(self) -> None:
        """Fill the rule keys (DEFAULTS) the user did not give: from ``preset`` first, then from DEFAULTS. Keys the
        chosen rule does not read are left None; giving one of them is a one-line error."""
        if self.preset is not None:
            _check(self.policy == "mat", f"mat.preset is only used with mat.policy='mat' (got {self.policy!r}); "
                                         f"remove it")
            _check_choice("mat.preset", self.preset, tuple(PRESETS))
            for key, value in PRESETS[self.preset].items():
                mine = getattr(self, key)
                if mine is None:
                    setattr(self, key, value)
                else:
                    _check(mine == value and isinstance(mine, bool) == isinstance(value, bool),
                           f"mat.{key}={mine!r} conflicts with mat.preset={self.preset!r}, which sets {key}={value!r}: "
                           f"remove one of the two")
        given = {key for key in DEFAULTS if getattr(self, key) is not None}  # by the user or the preset
        if self.policy != "mat":
            # 'fixed' is new (no old configs to keep loading): none of the rule keys may be given with it.
            mat_only = tuple(DEFAULTS) if self.policy == "fixed" else _MAT_ONLY
            bad = [key for key in mat_only if key in given]
            _check(not bad, f"mat.{bad[0] if bad else ''} is only used with mat.policy='mat'; remove it")
            for key, value in DEFAULTS.items():
                if key not in mat_only and getattr(self, key) is None:
                    setattr(self, key, value)
            return
        for key, value in DEFAULTS.items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        unused = []  # (key, the choice that reads it)
        if self.selection == "top_k":
            unused += [("alpha", "mat.selection='threshold'"), ("threshold_scope", "mat.selection='threshold'")]
        else:
            unused += [("active_budget", "mat.selection='top_k'")]
        if self.temporal_change == "relative":
            unused += [("temporal_reference", "mat.temporal_change='absolute'")]
        for key, where in unused:
            _check(key not in given, f"mat.{key} is only used with {where}; remove it")
            setattr(self, key, None)

    def describe(self) -> str:
        """One line: the rule this configuration runs (logged at start-up)."""
        keys = ["policy", "preset", "alpha", "beta", "selection", "selection_score", "active_budget", "hysteresis",
                "threshold_scope", "min_active_fraction", "probe_normalize", "temporal_change", "temporal_reference",
                "temporal_patience", "early_stop", "reactivate", "warmup_steps", "refresh_interval",
                "refresh_interval_max",
                "fixed_active_layers", "rand_active_fraction", "modules"]
        if "mlp" in self.modules:
            keys.append("mlp_groups")
        if self.refresh_backoff > 1:
            keys.insert(keys.index("refresh_interval_max"), "refresh_backoff")
        if self.policy != "mat":
            keys = [k for k in keys if k not in _MAT_ONLY and k not in ("preset", "alpha", "beta", "threshold_scope",
                                                                         "min_active_fraction", "reactivate")]
        return "mat: " + " ".join(f"{k}={getattr(self, k)!r}" for k in keys if getattr(self, k) is not None)

    def check_model(self, n_layer: int, layers: Optional[Sequence[int]] = None) -> None:
        """Checks that need the model: RaPTr path lengths must fit the layer count; the 'fixed' policy's layers must
        exist (``layers``: the model's unit layer indices, when known; else 0..n_layer-1)."""
        if self.policy == "raptr":
            for _, length in self.raptr_schedule:
                _check(2 <= length <= n_layer or n_layer < 2,
                       f"mat.raptr_schedule path length {length} must be in [2, n_layer={n_layer}]")
        if self.policy == "fixed":
            have = sorted(set(layers)) if layers is not None else list(range(n_layer))
            missing = [v for v in self.fixed_active_layers if v not in have]
            _check(not missing, f"mat.fixed_active_layers {missing} not in the model's layers "
                                f"{have if len(have) <= 8 else f'0..{n_layer - 1}'}")

    @property
    def freezes(self) -> bool:
        """Whether this configuration ever freezes anything."""
        return self.enabled and self.policy != "full"

    @property
    def needs_probe(self) -> bool:
        """Whether λmax must be measured (MAT decides with it; other policies only log it if enabled)."""
        return self.enabled and self.policy == "mat"

    @classmethod
    def from_dict(cls, block: Optional[dict]) -> "MATConfig":
        """Build from the JSON block; unknown keys are an error (a typo must not silently change the experiment)."""
        if block is None:
            return cls(enabled=False)
        _check(isinstance(block, dict), f'the "mat" block must be a JSON object, got {type(block).__name__}')
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(block) - known)
        _check(not unknown, f'unknown key(s) in the "mat" block: {", ".join(unknown)} (known: {", ".join(sorted(known))})')
        return cls(**block)


def _check_raptr_schedule(schedule: Any) -> None:
    msg = "mat.raptr_schedule must be a list of [start_step, path_length] with increasing starts, the first 0"
    _check(isinstance(schedule, list) and len(schedule) > 0, msg)
    starts = []
    for entry in schedule:
        _check(isinstance(entry, (list, tuple)) and len(entry) == 2
               and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in entry), msg)
        starts.append(entry[0])
    _check(starts[0] == 0 and all(a < b for a, b in zip(starts, starts[1:])), msg)


def load_config(config: Any) -> dict:
    """A DeepSpeed config given as a dict or a JSON path (one-line ``ConfigError`` otherwise)."""
    if isinstance(config, dict):
        return config
    if isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        if not os.path.isfile(path):
            raise ConfigError(f"DeepSpeed config {path} does not exist")
        try:
            with open(path, encoding="utf-8") as fh:
                cfg = json.load(fh)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {exc}") from None
        if not isinstance(cfg, dict):
            raise ConfigError(f"DeepSpeed config {path} must be a JSON object")
        return cfg
    raise ConfigError(f"config must be a dict or a path to a JSON file, got {type(config).__name__}")
