"""Typed configuration for mat_ds.

Two sources, one home:

* the ``"mat"`` block of the DeepSpeed JSON config (``MATConfig``) switches Modular Adaptive Training on and sets its
  policy. DeepSpeed accepts a custom top-level block and hands it back via ``engine.config["mat"]``;
* model, data and run settings (``ModelConfig``, ``DataConfig``, ``RunConfig``) come from command-line flags of
  ``launch/pretrain.py`` (one flag per field, help text = the field's ``help`` metadata).

Every dataclass validates itself in ``__post_init__`` and raises ``ConfigError`` with a one-line message; the entry point
turns that into ``error: ...`` on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
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
PROBE_OUTPUTS = ("loss", "logit_projection")
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
      whose λmax rises above the threshold (or starts moving again) trains again; without it freezing is permanent.
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
    probe_output: str = _help("Scalar per-sample output for the mNTK: 'loss' or 'logit_projection'.", default="loss")
    reactivate: bool = _help("Recompute the frozen set at every refresh (frozen heads can come back).", default=True)
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


# ----------------------------------------------------------------------------------------------------------------------
# Model / data / run: command-line flags
# ----------------------------------------------------------------------------------------------------------------------
ARCHS = ("bert", "gpt")


@dataclass
class ModelConfig:
    """A pre-LN transformer whose attention heads are separate parameters (see ``mat_ds/headwise.py``)."""

    arch: str = _help("'bert' (bidirectional, masked LM) or 'gpt' (causal LM).", default="bert")
    n_layer: int = _help("Transformer blocks.", default=4)
    n_head: int = _help("Attention heads per block: the modules MAT selects.", default=4)
    d_model: int = _help("Hidden size; must be divisible by n_head.", default=128)
    d_ff: int = _help("MLP hidden size (0 = 4·d_model).", default=0)
    dropout: float = _help("Dropout on attention output, MLP output and embeddings.", default=0.1)
    # Mixture of Experts (Switch Transformer on deepspeed.moe.layer.MoE; see mat_ds/moe.py)
    moe_num_experts: int = _help("Experts per MoE layer (0 = dense MLPs everywhere). Top-1 (Switch) routing.",
                                 default=0)
    moe_layer_interval: int = _help("Every k-th block has an MoE MLP: blocks l with (l+1) % k == 0 (Switch: 2).",
                                    default=2)
    moe_ep_size: int = _help("Expert parallelism: ranks that split one layer's experts (divides moe_num_experts "
                             "and the number of ranks).", default=1)
    moe_capacity_factor: float = _help("Training capacity factor: an expert takes at most "
                                       "factor * tokens / experts tokens per micro-batch (Switch: 1.25).", default=1.25)
    moe_eval_capacity_factor: float = _help("Capacity factor in evaluation.", default=2.0)
    moe_min_capacity: int = _help("Minimum expert capacity regardless of the factor.", default=4)
    moe_aux_loss_coef: float = _help("Weight of the load-balancing loss l_aux (Switch: 0.01).", default=0.01)

    def __post_init__(self) -> None:
        _check_choice("arch", self.arch, ARCHS)
        for name in ("n_layer", "n_head", "d_model", "moe_layer_interval", "moe_ep_size"):
            _check_int(name, getattr(self, name), 1)
        _check_int("d_ff", self.d_ff, 0)
        _check_int("moe_num_experts", self.moe_num_experts, 0)
        _check_int("moe_min_capacity", self.moe_min_capacity, 0)
        _check(self.d_model % self.n_head == 0, f"d_model={self.d_model} is not divisible by n_head={self.n_head}")
        _check(0 <= self.dropout < 1, f"dropout={self.dropout} must be in [0, 1)")
        for name in ("moe_capacity_factor", "moe_eval_capacity_factor"):
            value = getattr(self, name)
            _check(isinstance(value, (int, float)) and value > 0, f"{name}={value!r} must be > 0")
        _check(isinstance(self.moe_aux_loss_coef, (int, float)) and self.moe_aux_loss_coef >= 0,
               f"moe_aux_loss_coef={self.moe_aux_loss_coef!r} must be >= 0")
        if self.moe_num_experts:
            _check(self.moe_num_experts >= 2, f"moe_num_experts={self.moe_num_experts} must be 0 (dense) or >= 2")
            _check(self.moe_num_experts % self.moe_ep_size == 0,
                   f"moe_ep_size={self.moe_ep_size} must divide moe_num_experts={self.moe_num_experts}")
            _check(self.moe_layer_interval <= self.n_layer,
                   f"moe_layer_interval={self.moe_layer_interval} > n_layer={self.n_layer} leaves no MoE layer")
        else:
            _check(self.moe_ep_size == 1, "moe_ep_size > 1 needs moe_num_experts > 0")
        if self.d_ff == 0:
            self.d_ff = 4 * self.d_model

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_head

    @property
    def moe_layers(self) -> list[int]:
        """Indices of the blocks whose MLP is a Switch MoE layer (empty for a dense model)."""
        if not self.moe_num_experts:
            return []
        return [i for i in range(self.n_layer) if (i + 1) % self.moe_layer_interval == 0]


@dataclass
class DataConfig:
    """Where the text comes from and how it becomes fixed-length token blocks."""

    train_data: str = _help("'default' (embedded corpus), a local text file/dir/glob, or 'hf:NAME[:CONFIG[:SPLIT]]'.",
                            default="default")
    val_data: Optional[str] = _help("Validation text (same forms). Default: hold out val_fraction of train blocks.",
                                    default=None)
    test_data: Optional[str] = _help("Optional test text, evaluated at the end (same forms).", default=None)
    val_fraction: float = _help("Share of training blocks held out for validation when val_data is not given.",
                                default=0.05)
    seq_len: int = _help("Tokens per packed block.", default=128)
    vocab_size: int = _help("SentencePiece vocabulary size (trained on the training text, cached).", default=4096)
    mlm_probability: float = _help("BERT only: share of tokens masked (80% <mask>, 10% random, 10% kept).",
                                   default=0.15)
    cache_dir: str = _help("Where tokenizers and tokenized blocks are cached.", default=".cache/mat_ds")

    def __post_init__(self) -> None:
        _check(isinstance(self.train_data, str) and self.train_data.strip() != "", "train_data must not be empty")
        _check(0 <= self.val_fraction < 1, f"val_fraction={self.val_fraction} must be in [0, 1)")
        _check(self.val_data is not None or self.val_fraction > 0, "give val_data or a val_fraction > 0")
        _check_int("seq_len", self.seq_len, 8)
        _check_int("vocab_size", self.vocab_size, 64)
        _check(0 < self.mlm_probability < 1, f"mlm_probability={self.mlm_probability} must be in (0, 1)")


@dataclass
class RunConfig:
    """How long to train, what to evaluate, where to log and checkpoint."""

    train_steps: int = _help("Optimizer steps to train (the run ends there; a resumed run counts from its checkpoint).",
                             default=300)
    eval_interval: int = _help("Optimizer steps between validation evaluations (0 = only at the end).", default=50)
    eval_batches: int = _help("Micro-batches per rank in one validation pass (0 = the whole validation set).",
                              default=8)
    log_interval: int = _help("Optimizer steps between train/ log lines.", default=10)
    seed: int = _help("Seed for weights, data order, masking and dropout.", default=1234)
    out_dir: str = _help("Run directory: metrics.jsonl, W&B files, checkpoints (unless save_dir is given).",
                         default="runs/default")
    save_dir: Optional[str] = _help("DeepSpeed checkpoint directory (default: OUT_DIR/checkpoints).", default=None)
    save_interval: int = _help("Optimizer steps between checkpoints (0 = only at the end).", default=100)
    resume: str = _help("'auto' (resume from the latest checkpoint if there is one), 'never', or a checkpoint tag.",
                        default="auto")
    run_name: Optional[str] = _help("W&B run name (default: the out_dir's name).", default=None)
    wandb_project: str = _help("W&B project.", default="mat_ds")
    wandb_mode: str = _help("'offline', 'online' or 'disabled' (WANDB_MODE in the environment wins).", default="offline")
    comm_stats: bool = _help("Measure gradient-communication bytes per step with DeepSpeed's comms logger.",
                             default=False)
    flops_budget: float = _help("Stop once cumulative FLOPs (training + probe) reach this (0 = no budget); "
                                "train_steps stays a cap.", default=0.0)

    def __post_init__(self) -> None:
        _check_int("train_steps", self.train_steps, 1)
        for name in ("eval_interval", "eval_batches", "save_interval"):
            _check_int(name, getattr(self, name), 0)
        _check_int("log_interval", self.log_interval, 1)
        _check(self.flops_budget >= 0, f"flops_budget={self.flops_budget} must be >= 0")
        _check_choice("wandb_mode", self.wandb_mode, ("offline", "online", "disabled"))
        _check(self.resume.strip() != "", "resume must be 'auto', 'never' or a checkpoint tag")
        if self.save_dir is None:
            self.save_dir = os.path.join(self.out_dir, "checkpoints")
        if self.run_name is None:
            self.run_name = os.path.basename(os.path.normpath(self.out_dir))


CLI_SECTIONS = (ModelConfig, DataConfig, RunConfig)


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field of ModelConfig/DataConfig/RunConfig, e.g. ``--n_layer 6 --train_data corpus.txt``.

    Flags default to None ("not given") so that ``from_cli`` can tell a flag from a value in the JSON's ``"model"``
    block; the dataclass default applies when neither gives one."""
    for cls in CLI_SECTIONS:
        group = parser.add_argument_group(cls.__name__, (cls.__doc__ or "").strip().splitlines()[0])
        for f in dataclasses.fields(cls):
            default = f.default
            extra = {"nargs": "?", "const": True} if isinstance(default, bool) else {}  # `--flag` or `--flag false`
            kind = {int: int, float: float, bool: _parse_bool}.get(type(default), str)
            text = f.metadata.get("help", "") + f" (default: {default})"
            group.add_argument(f"--{f.name}", type=kind, default=None,
                               help=text.replace("%", "%%"), **extra)  # argparse %-formats help


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def from_cli(args: argparse.Namespace, ds_config: Optional[dict] = None) -> tuple[ModelConfig, DataConfig, RunConfig]:
    """Flags first, then (model settings only) the DeepSpeed JSON's optional ``"model"`` block, then the defaults.

    The ``"model"`` block lets a config file pin an architecture, e.g. ``{"model": {"moe_num_experts": 4,
    "moe_ep_size": 2}}`` in ``configs/switch_mat_ep2.json``; unknown keys in it are an error."""
    block = (ds_config or {}).get("model", {})
    _check(isinstance(block, dict), f'the "model" block must be a JSON object, got {type(block).__name__}')
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(block) - known)
    _check(not unknown, f'unknown key(s) in the "model" block: {", ".join(unknown)} (known: {", ".join(sorted(known))})')
    out = []
    for cls in CLI_SECTIONS:
        values = {}
        for f in dataclasses.fields(cls):
            given = getattr(args, f.name, None)
            if given is not None:
                values[f.name] = given
            elif cls is ModelConfig and f.name in block:
                values[f.name] = block[f.name]
        out.append(cls(**values))
    return tuple(out)  # type: ignore[return-value]


def load_deepspeed_config(path: str) -> dict:
    """Read the DeepSpeed JSON; a missing or malformed file is a one-line ConfigError."""
    if not os.path.isfile(path):
        raise ConfigError(f"DeepSpeed config {path} does not exist")
    try:
        with open(path, encoding="utf-8") as fh:
            cfg = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {exc}") from None
    _check(isinstance(cfg, dict), f"DeepSpeed config {path} must be a JSON object")
    return cfg


def as_dict(*configs: Any) -> dict:
    """Everything that defines a run, for W&B's config panel and the checkpoint."""
    return {type(c).__name__: dataclasses.asdict(c) for c in configs}
