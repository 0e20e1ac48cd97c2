"""Which heads train: the MAT policy and its baselines.

A policy sees the per-head λmax (flattened to [M] in ``layer * n_head + head`` order) at every refresh step and returns
the frozen mask for the steps until the next refresh. Policies run on rank 0 only; the trainer broadcasts the mask, so
every rank applies the same decision (a mismatch would abort/hang the gradient collectives).

MAT (Sec. 4 of the paper), with the choices the paper leaves open made explicit:

* modular policy: λ_α = λ_min + (λ_max − λ_min)·α over ALL heads of the model; a head trains only if λmax > λ_α.
  (If every head has the same λmax the threshold is meaningless and nobody is frozen by it.) With
  ``threshold_scope="layer"`` the same rule runs within each layer's units (``groups``: the layer of each unit).
* temporal policy: Δ_t = |λmax_t − λmax_{t−1}| between consecutive refreshes; Δ_1 is a head's FIRST measured change
  (from step 0 to the first refresh), the paper's reference. A head with Δ_t/Δ_1 < β has converged and is frozen.
* warm-up: before ``warmup_steps`` nothing is frozen; λmax is still measured so Δ_1 exists when freezing starts.
* re-activation: with ``reactivate`` (default) the frozen set is recomputed at each refresh (frozen heads' λmax keeps
  moving as the rest of the network trains, so they can come back); otherwise a frozen head stays frozen.
* floor: ``min_active_fraction`` > 0 keeps at least ceil(fraction·M) units training; the frozen units with the highest
  λmax come back first. Applied last, so it overrides both thresholds and ``reactivate``.

Opt-in variants (``MATConfig``; the defaults, ``config.DEFAULTS``, are the paper's rule above, decision for decision):

* ``selection_score="layer_z"``: the modular rule ranks the z-score of log λ within each layer's units, not λ, so a
  layer whose λ is 100× larger does not take every place; ``selection="top_k"``: instead of the α rule, the
  ceil(active_budget·M) highest-score units not stopped by the temporal rule train (ties: lower index first);
  ``hysteresis`` h: units the previous post-warm-up decision left training compare score + h (λ·e^h for raw λ)
  against a threshold computed from the unraised scores, or rank with it.
* temporal rule: ``temporal_reference="after_warmup"`` takes Δ_ref at the first refresh at or after warm-up (outside
  the LR transient); ``temporal_change="relative"`` compares |λ_t − λ_{t−1}|/λ_{t−1} with β (no reference);
  ``temporal_patience`` m: m consecutive measured refreshes below β; ``early_stop``: a unit stopped by the temporal
  rule stays frozen for the run (the floor still applies).
* ``FixedPolicy`` (``policy="fixed"``): a probe-free control, only ``fixed_active_layers`` train after warm-up.

Baselines on the same code path: ``full``; ``rand`` (the paper's MAT-Rand: random heads at a given active fraction);
``multirate`` (Vlaar & Leimkuhler 2022, reduced to what freezing expresses: a fixed random half of the heads is "slow"
and trains only every k-th step); ``raptr`` (Panigrahi et al. 2024, progressive subnetworks: each step trains a random
path of layers, first and last always included, whose length grows in stages; skipped layers are the identity and
cost nothing). Only ``raptr`` skips layers (``skipped_layers``); the others freeze heads.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .config import MATConfig

_EPS = 1e-12


class Policy:
    """Base: holds the current frozen mask and the λmax history (what a checkpoint must carry)."""

    name = "full"

    def __init__(self, cfg: MATConfig, n_modules: int, n_layers: int = 1, groups: Optional[list[int]] = None):
        self.cfg, self.n_modules, self.n_layers = cfg, n_modules, n_layers
        # The layer of each unit (threshold_scope="layer"); one group for all when not given.
        self.groups = torch.tensor(groups if groups is not None else [0] * n_modules, dtype=torch.long)
        if self.groups.numel() != n_modules:
            raise ValueError(f"groups has {self.groups.numel()} entries for {n_modules} units")
        self.frozen = torch.zeros(n_modules, dtype=torch.bool)
        self.history: list[tuple[int, list[float]]] = []  # (step, λmax per module) at every refresh

    def is_refresh_step(self, step: int) -> bool:
        return self.cfg.freezes and step % self.cfg.refresh_interval == 0

    def skipped_layers(self, step: int) -> torch.Tensor:
        """Layers left out of this step's forward and backward (BoolTensor [n_layers]); none by default."""
        return torch.zeros(self.n_layers, dtype=torch.bool)

    def update(self, step: int, lam: Optional[torch.Tensor]) -> torch.Tensor:
        """Record λmax (if measured) and return the new frozen mask (BoolTensor [M])."""
        if lam is not None:
            self.history.append((step, [float(v) for v in lam.flatten()]))
        self.frozen = self._decide(step, None if lam is None else lam.flatten().double())
        return self.frozen

    def _decide(self, step: int, lam: Optional[torch.Tensor]) -> torch.Tensor:
        return torch.zeros(self.n_modules, dtype=torch.bool)

    def state_dict(self) -> dict:
        return {"name": self.name, "frozen": self.frozen.tolist(), "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"checkpoint was written by policy {state.get('name')!r}, this run uses {self.name!r}")
        self.frozen = torch.tensor(state["frozen"], dtype=torch.bool)
        if self.frozen.numel() != self.n_modules:
            raise ValueError(f"checkpoint has {self.frozen.numel()} modules, the model has {self.n_modules}")
        self.history = [(int(s), list(v)) for s, v in state["history"]]


class MATPolicy(Policy):
    """The paper's rule with the opt-in variants of the module docstring. With ``refresh_backoff`` > 1 the refresh
    schedule adapts: after warm-up, each refresh whose decision repeats the previous one lengthens the gap to the next
    (×backoff, at most ``refresh_interval_max``); a changed decision resets it to ``refresh_interval``."""

    name = "mat"

    def __init__(self, cfg: MATConfig, n_modules: int, n_layers: int = 1, groups: Optional[list[int]] = None):
        super().__init__(cfg, n_modules, n_layers, groups)
        self.prev: Optional[torch.Tensor] = None  # λmax at the previous refresh
        # The temporal reference Δ_ref per module (temporal_reference 'first': the first measured |Δλmax|, the paper's
        # Δ_1; 'after_warmup': the first one measured at or after warmup_steps). Unused with temporal_change 'relative'.
        self.delta1: Optional[torch.Tensor] = None
        self.ratio: Optional[torch.Tensor] = None  # the temporal change at the last refresh (Δ_t/Δ_ref or relative)
        self.below = torch.zeros(n_modules, dtype=torch.long)  # consecutive measured refreshes with change < β
        self.stopped = torch.zeros(n_modules, dtype=torch.bool)  # early_stop: stopped by the temporal rule for good
        self.gap = cfg.refresh_interval  # refresh_backoff: steps from the last refresh to the next
        self.next_refresh = 0

    def is_refresh_step(self, step: int) -> bool:
        if self.cfg.refresh_backoff <= 1:
            return super().is_refresh_step(step)
        return self.cfg.freezes and step >= self.next_refresh

    def update(self, step: int, lam: Optional[torch.Tensor]) -> torch.Tensor:
        before = self.frozen.clone()
        frozen = super().update(step, lam)
        cfg = self.cfg
        if cfg.refresh_backoff > 1:
            same = step > cfg.warmup_steps and bool(torch.equal(before, frozen)) and \
                any(s >= cfg.warmup_steps for s, _ in self.history[:-1])
            self.gap = min(max(round(self.gap * cfg.refresh_backoff), self.gap + 1), cfg.refresh_interval_max) \
                if same else cfg.refresh_interval
            self.next_refresh = step + self.gap
        return frozen

    def _decide(self, step: int, lam: Optional[torch.Tensor]) -> torch.Tensor:
        if lam is None:
            raise ValueError("the MAT policy needs λmax at every refresh")
        cfg = self.cfg
        if self.prev is not None:
            delta = (lam - self.prev).abs()
            if cfg.temporal_change == "relative":
                self.ratio = delta / self.prev.abs().clamp_min(_EPS)
            else:
                if self.delta1 is None and (cfg.temporal_reference == "first" or step >= cfg.warmup_steps):
                    self.delta1 = delta.clone()
                if self.delta1 is not None:
                    self.ratio = delta / self.delta1.clamp_min(_EPS)
            if self.ratio is not None:
                self.below = torch.where(self.ratio < cfg.beta, self.below + 1, torch.zeros_like(self.below))
        self.prev = lam.clone()
        if step < cfg.warmup_steps:
            return torch.zeros(self.n_modules, dtype=torch.bool)
        # Hysteresis favours the units the previous post-warm-up decision left training (none at the first one).
        decided = any(s >= cfg.warmup_steps for s, _ in self.history[:-1])
        active = ~self.frozen if (decided and cfg.hysteresis > 0) else torch.zeros(self.n_modules, dtype=torch.bool)
        stopped = self.below >= cfg.temporal_patience if self.ratio is not None \
            else torch.zeros(self.n_modules, dtype=torch.bool)
        if cfg.early_stop:
            self.stopped = self.stopped | stopped
            stopped = stopped | self.stopped
        score = self.score(lam)
        if cfg.selection == "top_k":
            frozen = self.top_k_frozen(score + cfg.hysteresis * active.double(), stopped, cfg.active_budget)
        else:
            if cfg.selection_score == "lambda":  # the paper's α rule on raw λ (hysteresis: λ·e^h vs λ_α)
                boosted = lam * torch.exp(cfg.hysteresis * active.double()) if active.any() else lam
                rule = self.modular_frozen
            else:
                boosted, rule = score + cfg.hysteresis * active.double(), self.z_frozen
            if cfg.threshold_scope == "layer":
                frozen = torch.zeros(self.n_modules, dtype=torch.bool)
                for g in self.groups.unique():
                    sel = self.groups == g
                    frozen[sel] = rule(score[sel] if rule is self.z_frozen else lam[sel], cfg.alpha, boosted[sel])
            else:
                frozen = rule(score if rule is self.z_frozen else lam, cfg.alpha, boosted)
            frozen |= stopped
        if not cfg.reactivate:
            frozen |= self.frozen
        return self.apply_floor(frozen, lam if cfg.selection_score == "lambda" else score, cfg.min_active_fraction)

    def score(self, lam: torch.Tensor) -> torch.Tensor:
        """The selection score: log λ ('lambda'; λ <= 0 -> -inf) or its z-score within each layer ('layer_z')."""
        log = torch.where(lam > 0, lam.clamp_min(1e-300).log(), torch.full_like(lam, -math.inf))
        if self.cfg.selection_score == "lambda":
            return log
        z = torch.full_like(log, -math.inf)
        for g in self.groups.unique():
            sel = (self.groups == g) & torch.isfinite(log)
            if not sel.any():
                continue
            vals = log[sel]
            std = vals.std(unbiased=False) if vals.numel() > 1 else vals.new_zeros(())
            z[sel] = (vals - vals.mean()) / std if std > _EPS else torch.zeros_like(vals)
        return z

    @staticmethod
    def top_k_frozen(score: torch.Tensor, stopped: torch.Tensor, budget: float) -> torch.Tensor:
        """Train the ceil(budget·M) highest-score units among those not ``stopped`` (ties: lower index first)."""
        k = math.ceil(budget * score.numel() - 1e-9)
        frozen = torch.ones_like(stopped)
        idx = torch.nonzero(~stopped).flatten()
        order = torch.argsort(-score[idx], stable=True)
        frozen[idx[order[:k]]] = False
        return frozen

    @staticmethod
    def z_frozen(z: torch.Tensor, alpha: float, boosted: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The α rule on scores that may be -inf (λ <= 0): z_α = z_min + (z_max − z_min)·α over the finite ones; a
        unit is frozen if its (boosted) score <= z_α; -inf units always. No spread: only -inf units are frozen."""
        boosted = z if boosted is None else boosted
        fin = torch.isfinite(z)
        if not fin.any():
            return torch.ones_like(z, dtype=torch.bool)
        lo, hi = z[fin].min(), z[fin].max()
        if hi - lo <= _EPS * max(abs(float(hi)), 1.0):
            return ~fin
        return (boosted <= lo + (hi - lo) * alpha) | ~fin

    @staticmethod
    def apply_floor(frozen: torch.Tensor, lam: torch.Tensor, fraction: float) -> torch.Tensor:
        """Re-activate the highest-λmax frozen units until ceil(fraction·M) train (ties: lower index first)."""
        need = math.ceil(fraction * frozen.numel() - 1e-9) - int((~frozen).sum())
        if fraction <= 0 or need <= 0:
            return frozen
        frozen = frozen.clone()
        idx = torch.nonzero(frozen).flatten()
        order = torch.argsort(-lam[idx], stable=True)
        frozen[idx[order[:need]]] = False
        return frozen

    @staticmethod
    def modular_frozen(lam: torch.Tensor, alpha: float, boosted: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The paper's α rule: frozen if λ <= λ_min + (λ_max − λ_min)·α (``boosted``: the values compared, default λ)."""
        lo, hi = lam.min(), lam.max()
        if hi - lo <= _EPS * max(abs(float(hi)), 1.0):
            return torch.zeros_like(lam, dtype=torch.bool)
        return (lam if boosted is None else boosted) <= lo + (hi - lo) * alpha

    def state_dict(self) -> dict:
        out = super().state_dict()
        out.update(prev=None if self.prev is None else self.prev.tolist(),
                   delta1=None if self.delta1 is None else self.delta1.tolist(),
                   ratio=None if self.ratio is None else self.ratio.tolist(),
                   below=self.below.tolist(), stopped=self.stopped.tolist(), gap=self.gap,
                   next_refresh=self.next_refresh)
        return out

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        for key in ("prev", "delta1", "ratio"):
            val = state.get(key)
            setattr(self, key, None if val is None else torch.tensor(val, dtype=torch.float64))
        # Written before temporal_patience / early_stop existed: no counts, nothing early-stopped.
        below, stopped = state.get("below"), state.get("stopped")
        self.below = torch.zeros(self.n_modules, dtype=torch.long) if below is None \
            else torch.tensor(below, dtype=torch.long)
        self.stopped = torch.zeros(self.n_modules, dtype=torch.bool) if stopped is None \
            else torch.tensor(stopped, dtype=torch.bool)
        self.gap = int(state.get("gap", self.cfg.refresh_interval))  # before refresh_backoff: the fixed interval
        self.next_refresh = int(state.get("next_refresh", 0))


class FixedPolicy(Policy):
    """Probe-free control: from ``warmup_steps`` on, only the units in ``fixed_active_layers`` train, for good."""

    name = "fixed"

    def is_refresh_step(self, step: int) -> bool:
        return self.cfg.freezes and (step % self.cfg.refresh_interval == 0 or step == self.cfg.warmup_steps)

    def _decide(self, step: int, lam: Optional[torch.Tensor]) -> torch.Tensor:
        if step < self.cfg.warmup_steps:
            return torch.zeros(self.n_modules, dtype=torch.bool)
        return ~torch.isin(self.groups, torch.tensor(self.cfg.fixed_active_layers, dtype=torch.long))


class RandPolicy(Policy):
    """MAT-Rand: after warm-up, a uniformly random ``rand_active_fraction`` of heads trains, redrawn every refresh."""

    name = "rand"

    def _decide(self, step: int, lam: Optional[torch.Tensor]) -> torch.Tensor:
        frozen = torch.zeros(self.n_modules, dtype=torch.bool)
        if step < self.cfg.warmup_steps:
            return frozen
        n_active = max(1, round(self.cfg.rand_active_fraction * self.n_modules))
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)
        frozen[torch.randperm(self.n_modules, generator=gen)[n_active:]] = True
        return frozen


class MultiratePolicy(Policy):
    """Fast/slow heads: a seeded random ``multirate_slow_fraction`` of heads trains only on every k-th step."""

    name = "multirate"

    def __init__(self, cfg: MATConfig, n_modules: int, n_layers: int = 1, groups: Optional[list[int]] = None):
        super().__init__(cfg, n_modules, n_layers, groups)
        gen = torch.Generator().manual_seed(cfg.seed)
        n_slow = max(1, round(cfg.multirate_slow_fraction * n_modules))
        self.slow = torch.zeros(n_modules, dtype=torch.bool)
        self.slow[torch.randperm(n_modules, generator=gen)[:n_slow]] = True

    def is_refresh_step(self, step: int) -> bool:
        return True  # the frozen set changes with step % k

    def _decide(self, step: int, lam: Optional[torch.Tensor]) -> torch.Tensor:
        if step < self.cfg.warmup_steps or step % self.cfg.multirate_k == 0:
            return torch.zeros(self.n_modules, dtype=torch.bool)
        return self.slow.clone()


class RaPTrPolicy(Policy):
    """Random path of layers per step; the path length follows ``raptr_schedule``; first and last layer fixed."""

    name = "raptr"

    def is_refresh_step(self, step: int) -> bool:
        return True  # a new path every step

    def path_length(self, step: int) -> int:
        length = self.n_layers
        for start, value in self.cfg.raptr_schedule:
            if step >= start:
                length = value
        return min(max(length, min(2, self.n_layers)), self.n_layers)

    def skipped_layers(self, step: int) -> torch.Tensor:
        L, p = self.n_layers, self.path_length(step)
        skipped = torch.zeros(L, dtype=torch.bool)
        if p >= L:
            return skipped
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)
        middle = torch.randperm(L - 2, generator=gen)[: L - p] + 1  # layers 1..L-2 that are left out
        skipped[middle] = True
        return skipped


def make_policy(cfg: MATConfig, n_modules: int, n_layers: int = 1, groups: Optional[list[int]] = None) -> Policy:
    """The policy for one unit kind; ``groups`` is each unit's layer (used by ``threshold_scope="layer"``)."""
    if not cfg.freezes:
        return Policy(cfg, n_modules, n_layers, groups)
    cls = {"mat": MATPolicy, "rand": RandPolicy, "multirate": MultiratePolicy, "raptr": RaPTrPolicy,
           "fixed": FixedPolicy}[cfg.policy]
    return cls(cfg, n_modules, n_layers, groups)
