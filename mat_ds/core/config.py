"""The ``"mat"`` block of the DeepSpeed JSON config (``MATConfig``) and the one-line ``ConfigError``.

DeepSpeed accepts a custom top-level block and hands it back via ``engine.config["mat"]``; ``mat_ds.initialize`` reads
it from there. Every field has a docstring (its ``help`` metadata) and is validated in ``__post_init__``: a bad value is
a ``ConfigError`` whose message is one line and says what to change.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional


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
POLICIES = ("mat", "rand", "full", "multirate", "raptr")
PROBE_OUTPUTS = ("loss", "logit_projection", "logit_sum")
MODULE_KINDS = ("heads", "experts")


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
    """

    enabled: bool = _help("Turn MAT (or the chosen baseline policy) on.", default=True)
    policy: str = _help("'mat' (α/β policy); baselines: 'full' (no freezing), 'rand' (random heads at "
                        "rand_active_fraction), 'multirate' (slow heads updated every multirate_k steps), 'raptr' "
                        "(random path of layers, growing in stages).", default="mat")
    alpha: float = _help("Modular threshold: heads with λmax > λmin + (λmax-λmin)·alpha train. In [0, 1].", default=0.1)
    beta: float = _help("Temporal threshold: a head with Δ_t/Δ_1 < beta has converged and is frozen. In [0, 1].",
                        default=0.05)
    warmup_steps: int = _help("Optimizer steps of full training before any head is frozen.", default=50)
    refresh_interval: int = _help("Optimizer steps between λmax refreshes (and policy decisions).", default=25)
    probe_samples: int = _help("n, the number of probe sequences for the n×n mNTK Gram (>= 2).", default=16)
    probe_output: str = _help("Scalar per-sample output f_i for the mNTK: 'loss' (mean cross-entropy over the "
                              "sample's targets), 'logit_projection' (<r_t, logits_t>, fixed random unit r_t) or "
                              "'logit_sum' (sum of the target positions' logits).", default="loss")
    probe_gram: str = _help("How a layer's per-unit Gram is formed: 'materialized' (per-sample gradients, "
                            "n·d_in·d_out numbers), 'ghost' (activation Grams, 2·(n·T)² numbers) or 'auto' (per layer, "
                            "the cheaper in FLOPs within probe_memory_mb).", default="auto")
    probe_memory_mb: int = _help("Memory bound for one layer's Gram work in a refresh (MiB); a probe that cannot fit "
                                 "is a one-line error at start-up.", default=2048)
    reactivate: bool = _help("Recompute the frozen set at every refresh (frozen heads can come back).", default=True)
    threshold_scope: str = _help("Where λ_α = λmin + (λmax-λmin)·alpha is computed: 'global' (over all units of a kind, "
                                 "the paper) or 'layer' (over each layer's units separately).", default="global")
    min_active_fraction: float = _help("Policy 'mat': at least ceil(fraction·units) units of each kind keep training "
                                       "after warm-up (the highest-λmax frozen ones are re-activated). 0 = all may "
                                       "freeze (the paper). In [0, 1].", default=0.0)
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
    modules: list = _help("Module kinds the policy selects: 'heads' (attention heads) and/or 'experts' (MoE experts; "
                          "ignored for a dense model). Each kind gets its own threshold: λ scales differ by kind.",
                          default_factory=lambda: ["heads", "experts"])
    seed: int = _help("Seed for the probe set and the random baselines.", default=0)
    log_heatmap_interval: int = _help("Optimizer steps between per-head λmax tables/heatmaps in W&B (0 = never).",
                                      default=100)

    def __post_init__(self) -> None:
        _check_choice("mat.policy", self.policy, POLICIES)
        _check_choice("mat.probe_output", self.probe_output, PROBE_OUTPUTS)
        _check_choice("mat.probe_gram", self.probe_gram, ("auto", "materialized", "ghost"))
        _check_int("mat.probe_memory_mb", self.probe_memory_mb, 1)
        _check_unit("mat.alpha", self.alpha)
        _check_unit("mat.beta", self.beta)
        _check_int("mat.warmup_steps", self.warmup_steps, 0)
        _check_int("mat.refresh_interval", self.refresh_interval, 1)
        _check_int("mat.probe_samples", self.probe_samples, 2)
        _check_int("mat.seed", self.seed, 0)
        _check_int("mat.log_heatmap_interval", self.log_heatmap_interval, 0)
        _check(isinstance(self.enabled, bool), f"mat.enabled={self.enabled!r} must be true or false")
        _check(isinstance(self.modules, list) and len(self.modules) > 0
               and all(m in MODULE_KINDS for m in self.modules) and len(set(self.modules)) == len(self.modules),
               f"mat.modules={self.modules!r} must be a non-empty list of distinct kinds from {list(MODULE_KINDS)}")
        _check(isinstance(self.reactivate, bool), f"mat.reactivate={self.reactivate!r} must be true or false")
        _check_choice("mat.threshold_scope", self.threshold_scope, ("global", "layer"))
        _check_unit("mat.min_active_fraction", self.min_active_fraction)
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

    def check_model(self, n_layer: int) -> None:
        """Checks that need the model: RaPTr path lengths must fit the layer count."""
        if self.policy == "raptr":
            for _, length in self.raptr_schedule:
                _check(2 <= length <= n_layer or n_layer < 2,
                       f"mat.raptr_schedule path length {length} must be in [2, n_layer={n_layer}]")

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
