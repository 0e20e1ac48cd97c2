"""Every benchmark method as data, in one place: the ``"mat"`` block each one runs with.

A block's values are either literals or ``"$name"`` placeholders filled per run by ``block``: ``$alpha``, ``$beta``,
``$mat_warmup``, ``$refresh_interval``, ``$probe_samples`` from the benchmark scale, ``$seed`` from the run, and the
settings a method derives from another run of the same seed (``$rand_fraction``: the active fraction its MAT run
chose; ``$raptr_schedule``: stages in thirds of full's length). The harnesses (``paper_table.py`` for the short-run
table, ``converge.py`` for the convergence regime, ``tune.py`` for the tuned baseline) only fill them in.

Families of names are patterns: ``mat_a{α}_b{β}`` (an α/β cell), ``rand_a{α}_b{β}`` (random heads at that cell's
active fraction), ``switch_full`` / ``switch_mat`` (the Switch-MoE model, same blocks as full / mat); a ``_mlp``
suffix on a cell (``mat_a{α}_b{β}_mlp``) selects MLP units too (``MLP``: heads + 4 MLP groups per layer).
"""
from __future__ import annotations

import copy
import re
from typing import Any, Optional

# The settings every probed (λ-measuring) MAT run shares; no W&B image during a benchmark (λ is in metrics.jsonl).
_PROBED = {"warmup_steps": "$mat_warmup", "refresh_interval": "$refresh_interval", "probe_samples": "$probe_samples",
           "seed": "$seed", "log_heatmap_interval": 0}
_MAT = {"policy": "mat", "alpha": "$alpha", "beta": "$beta", **_PROBED}
# MLP units (issue "MLP blocks as MAT units"): each layer's MLP as 4 groups of its hidden channels, next to the heads
MLP = {"modules": ["heads", "mlp"], "mlp_groups": 4}

METHODS: dict[str, dict[str, Any]] = {
    "full": {"policy": "full"},
    "mat": _MAT,  # the paper's α 0.1, β 0.05 (the scale's alpha/beta)
    # the paper's MAT-Rand control: random heads at the active fraction MAT chose (same seed), redrawn every refresh
    "rand": {"policy": "rand", "rand_active_fraction": "$rand_fraction", "warmup_steps": "$mat_warmup",
             "refresh_interval": "$refresh_interval", "seed": "$seed"},
    "multirate": {"policy": "multirate", "multirate_k": 4, "multirate_slow_fraction": 0.5,
                  "warmup_steps": "$mat_warmup", "seed": "$seed"},
    "raptr": {"policy": "raptr", "raptr_schedule": "$raptr_schedule", "seed": "$seed"},
    # open choices at the default α/β
    "mat_logit_sum": {**_MAT, "probe_output": "logit_sum"},
    "mat_layer": {**_MAT, "threshold_scope": "layer"},
    "mat_floor": {**_MAT, "min_active_fraction": 0.25},
    # scale-free λ selection (issue "MAT that earns its keep", item 2): the z-score of log λ within each layer, the top
    # quarter of units by it (about one head per layer here), hysteresis 0.5 z against flicker, no temporal rule; and
    # its control: random heads at the same share, redrawn every refresh (the paper's MAT-Rand at a fixed budget)
    "mat_z_k25": {"policy": "mat", "beta": 0.0, "selection": "top_k", "active_budget": 0.25,
                  "selection_score": "layer_z", "hysteresis": 0.5, **_PROBED},
    "rand_k25": {"policy": "rand", "rand_active_fraction": 0.25, "warmup_steps": "$mat_warmup",
                 "refresh_interval": "$refresh_interval", "seed": "$seed"},
    # probe-free fixed masks (no λ at all): what a λ-guided choice must beat. The winning α 0.05/β 0 cell trained
    # layer 0's heads all the time and little else, so "freeze the attention of layers 1.. at the end of warm-up" is
    # its trivial control, and "freeze all attention there" the floor of the per-step saving.
    "fixed_l0": {"policy": "fixed", "fixed_active_layers": [0], "warmup_steps": "$mat_warmup", "seed": "$seed"},
    "fixed_none": {"policy": "fixed", "fixed_active_layers": [], "warmup_steps": "$mat_warmup", "seed": "$seed"},
    # their MLP analogues: the same layers' MLP units frozen too (MLP holds 2/3 of a layer's weights: the per-step
    # saving heads alone cannot give)
    "fixed_l0_mlp": {"policy": "fixed", "fixed_active_layers": [0], "warmup_steps": "$mat_warmup", "seed": "$seed",
                     **MLP},
    "fixed_none_mlp": {"policy": "fixed", "fixed_active_layers": [], "warmup_steps": "$mat_warmup", "seed": "$seed",
                       **MLP},
}
_CELL = re.compile(r"(mat|rand)_a([0-9.]+)_b([0-9.]+)(_mlp)?")


def template(method: str) -> dict[str, Any]:
    """The block of ``method`` with its placeholders; ValueError for a name that is no method."""
    base = method[len("switch_"):] if method in ("switch_full", "switch_mat") else method
    if base in METHODS:
        return copy.deepcopy(METHODS[base])
    m = _CELL.fullmatch(method)
    if m and m.group(1) == "mat":
        return {**copy.deepcopy(_MAT), "alpha": float(m.group(2)), "beta": float(m.group(3)),
                **(copy.deepcopy(MLP) if m.group(4) else {})}
    if m and not m.group(4):  # the control of a cell: random heads at the fraction that cell's MAT run chose
        return copy.deepcopy(METHODS["rand"])
    raise ValueError(f"unknown method {method!r}")


def needs(method: str) -> set[str]:
    """The derived settings (placeholder names) a method's block needs from another run."""
    return {v[1:] for v in template(method).values() if isinstance(v, str) and v.startswith("$")} & {
        "rand_fraction", "raptr_schedule"}


def block(method: str, scale, seed: int, **derived: Any) -> dict[str, Any]:
    """The ``"mat"`` block of one run: the template with ``scale``'s fields, ``seed`` and ``derived`` filled in."""
    values: dict[str, Optional[Any]] = {"alpha": scale.alpha, "beta": scale.beta, "mat_warmup": scale.mat_warmup,
                                        "refresh_interval": scale.refresh_interval,
                                        "probe_samples": scale.probe_samples, "seed": seed, **derived}
    out = {}
    for key, value in template(method).items():
        if isinstance(value, str) and value.startswith("$"):
            if values.get(value[1:]) is None:
                raise ValueError(f"method {method!r} needs {value[1:]!r}")
            value = values[value[1:]]
        out[key] = value
    return out
