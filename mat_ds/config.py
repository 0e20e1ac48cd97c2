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
import os
from dataclasses import dataclass
from typing import Any, Optional


from .core.config import ConfigError, MATConfig, _check, _check_choice, _check_int, _help, load_config  # noqa: F401


# ----------------------------------------------------------------------------------------------------------------------
# Model / data / run: command-line flags
# ----------------------------------------------------------------------------------------------------------------------
ARCHS = ("bert", "gpt")


@dataclass
class ModelConfig:
    """The model: mat_ds's own pre-LN transformer (head-wise by construction), or a Hugging Face model on disk."""

    model: str = _help("'own' (mat_ds's transformer, shaped by the flags below) or 'hf:PATH' (a local HF model "
                       "directory or config.json: random init from the config, its weights when present; the "
                       "shape flags below are then ignored).", default="own")
    arch: str = _help("'bert' (bidirectional, masked LM) or 'gpt' (causal LM).", default="bert")
    n_layer: int = _help("Transformer blocks.", default=4)
    n_head: int = _help("Attention heads per block: the modules MAT selects.", default=4)
    d_model: int = _help("Hidden size; must be divisible by n_head.", default=128)
    d_ff: int = _help("MLP hidden size (0 = 4·d_model).", default=0)
    dropout: float = _help("Dropout on attention output, MLP output and embeddings.", default=0.1)
    # Mixture of Experts (Switch Transformer on deepspeed.moe.layer.MoE; see mat_ds/models/switch.py)
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
        _check(self.model == "own" or (isinstance(self.model, str) and self.model.startswith("hf:")
                                       and len(self.model) > 3),
               f"model={self.model!r} must be 'own' or 'hf:PATH'")
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
    universal: str = _help("Elastic resume: a checkpoint written at another data-parallel size or ZeRO stage loads "
                           "through DeepSpeed's universal checkpoint. 'auto': rank 0 converts the tag once into "
                           "TAG_universal (ds_to_universal) and the run loads it; 'never': stop with one line giving "
                           "the conversion command; 'always': load through a universal copy even at the same layout "
                           "(what \"checkpoint\": {\"load_universal\": true} in the DeepSpeed JSON means). "
                           "docs/elastic_resume.md.", default="auto")
    keep_checkpoints: int = _help("Checkpoints kept in save_dir (Hugging Face's save_total_limit): after each save "
                                  "completed on every rank, rank 0 removes all global_stepN tags but the N newest, "
                                  "the one `latest` names and the one of the step with the best monitored evaluation "
                                  "loss (the loss patience watches; there is one when a save fell on that step, e.g. "
                                  "save_interval a multiple of eval_interval); 0 = keep all. Other tag names are "
                                  "never removed.", default=3)
    run_name: Optional[str] = _help("W&B run name (default: the out_dir's name).", default=None)
    wandb_project: str = _help("W&B project.", default="mat_ds")
    wandb_mode: str = _help("'offline', 'online' or 'disabled' (WANDB_MODE in the environment wins).", default="offline")
    comm_stats: bool = _help("Measure gradient-communication bytes per step with DeepSpeed's comms logger.",
                             default=False)
    flops_budget: float = _help("Stop once cumulative FLOPs (training + probe) reach this (0 = no budget); "
                                "train_steps stays a cap.", default=0.0)
    patience: int = _help("Stop after this many consecutive evaluations without a new lowest test loss (validation "
                          "loss without test data); 0 = off. train_steps stays a cap.", default=0)
    patience_from: int = _help("Early stopping counts only evaluations at or after this step (0 = all): a staged "
                               "schedule (RaPTr's growing paths) is judged from its last stage, not stopped on the "
                               "plateau of an earlier one.", default=0)

    def __post_init__(self) -> None:
        _check_int("train_steps", self.train_steps, 1)
        for name in ("eval_interval", "eval_batches", "save_interval", "keep_checkpoints", "patience",
                     "patience_from"):
            _check_int(name, getattr(self, name), 0)
        _check_int("log_interval", self.log_interval, 1)
        _check(not self.patience or self.eval_interval > 0, "patience needs eval_interval > 0 (it counts evaluations)")
        _check(not self.patience_from or self.patience, "patience_from needs patience > 0 (it delays early stopping)")
        _check(self.flops_budget >= 0, f"flops_budget={self.flops_budget} must be >= 0")
        _check_choice("wandb_mode", self.wandb_mode, ("offline", "online", "disabled"))
        _check(self.resume.strip() != "", "resume must be 'auto', 'never' or a checkpoint tag")
        _check_choice("universal", self.universal, ("auto", "never", "always"))
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
    """Read the DeepSpeed JSON; a missing or malformed file is a one-line ConfigError (``core.config.load_config``)."""
    return load_config(path)


def as_dict(*configs: Any) -> dict:
    """Everything that defines a run, for W&B's config panel and the checkpoint."""
    return {type(c).__name__: dataclasses.asdict(c) for c in configs}
