"""MAT for Hugging Face ``transformers.Trainer`` users: ``MATTrainer``, a drop-in ``Trainer``.

The one line a user with a ``"mat"`` block in the DeepSpeed JSON changes (``TrainingArguments(deepspeed="ds.json")``,
launched with ``deepspeed --num_gpus N train.py``)::

    trainer = MATTrainer(model=model, args=args, train_dataset=ds)    # was: Trainer(model=model, args=args, ...)

with ``from mat_ds.hf_trainer import MATTrainer``. Everything else (``trainer.train(resume_from_checkpoint=...)``,
``save_steps``, ``report_to=["wandb"]``, callbacks) stays as it is. No ``"mat"`` block, or ``"enabled": false``: it IS
``Trainer`` (nothing converted or hooked), like ``mat_ds.initialize``.

Why a subclass and not ``enable_mat(trainer)`` + a ``TrainerCallback``: the model must be converted before the Trainer
collects parameters for the optimizer (``deepspeed_init`` / ``create_optimizer``, at ``train()``), and the controller
must sit on the engine before ``_prepare_for_training`` calls ``deepspeed_load_checkpoint(engine, ...)`` on resume;
the first callback event (``on_train_begin``) fires after both. A subclass is how HF extends ``Trainer``
(``Seq2SeqTrainer``, TRL's trainers) and owns the two public seams we need:

1. ``__init__`` / ``call_model_init``: ``mat_ds.wrapper.prepare_model`` converts ``self.model`` in place (the same
   code as ``mat_ds.initialize``), so the DeepSpeed optimizer (``DummyOptim(model.parameters())``) or HF's own
   ``create_optimizer`` groups hold the head-wise parameters; ``get_decay_parameter_names`` keeps HF's no-decay rule
   for the per-head biases ``b{u}`` of converted Q/K/V;
2. ``self.accelerator.prepare``: accelerate calls ``deepspeed.initialize`` inside it. Wrapped once, it attaches
   ``MATController`` (``mat_ds.wrapper.attach``, again ``initialize``'s code) to the training engine it returns,
   i.e. right after the engine exists and before HF sets ``model_wrapped`` and loads a checkpoint. The wrapped
   ``engine.save_checkpoint`` / ``load_checkpoint`` then carry MAT's state (policies, frozen sets, probe set) in every
   ``checkpoint-N`` and restore it on ``resume_from_checkpoint``.

Probe set: captured by the controller's forward pre-hook from the first training batches (HF calls the engine with
keyword arguments), or ``MATTrainer(..., probe_batch=...)``; ``probe_fn=`` overrides the family's default.

Logging: every training log entry (``"loss"`` in it, i.e. every ``logging_steps``) gets ``engine.mat.metrics()``
merged in before HF appends it to ``trainer.state.log_history`` and calls the ``report_to`` callbacks (W&B shows them
as ``train/mat/...``, HF's prefix). The entry of HF step k (1-based) describes optimizer step k: ``mat/active_fraction``
and ``mat/frozen_params`` are the frozen set it trained with. λmax keys (``mat/lambda_max/L{l}H{u}``,
``mat/refresh_seconds``) are reported ONCE, in the first entry after the refresh that measured them (refresh at engine
step s -> entry "step": s+1 with ``logging_steps=1``); with ``logging_steps`` > ``refresh_interval`` only the latest
refresh's values are kept. ``trainer.log_next({...})`` adds a callback's own values to the next entry.

Rules (one-line ``ConfigError``): MAT needs DeepSpeed (``TrainingArguments(deepspeed=...)``); decisions are taken at
optimizer-step boundaries, which the Trainer sets from ``args.gradient_accumulation_steps``, so an explicit
``gradient_accumulation_steps`` in the JSON must equal it (use ``"auto"``); no PEFT models; the model must not be
ZeRO-3-partitioned before conversion (build it before ``TrainingArguments`` with stage 3). Weights saved by
``save_model`` keep the head-wise parameter names (``mat_ds.convert_model`` an unconverted model before loading them).
CPU-only ranks (CI): pass ``TrainingArguments(use_cpu=True)``; without a GPU backend accelerate would count one process.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from transformers import Trainer

from .core.config import ConfigError, MATConfig
from .core.engine import MATController
from .wrapper import attach, prepare_model
from .core.headwise import HeadwiseLinear


def check_trainer_args(args, ds_config: Optional[dict]) -> Optional[MATConfig]:
    """The MAT configuration of a Trainer run, or None when the DeepSpeed config has no enabled ``"mat"`` block.
    Raises a one-line ``ConfigError`` for settings MAT cannot run with (module docstring, "Rules")."""
    if ds_config is None:
        raise ConfigError("MATTrainer runs MAT inside the DeepSpeed engine: pass TrainingArguments(deepspeed="
                          "'ds_config.json') with a \"mat\" block and launch with `deepspeed --num_gpus N train.py` "
                          "(or use transformers.Trainer for a run without MAT)")
    mat = MATConfig.from_dict(ds_config.get("mat"))
    if not mat.enabled:
        return None
    ga = ds_config.get("gradient_accumulation_steps", "auto")
    if ga != "auto" and int(ga) != int(args.gradient_accumulation_steps):
        raise ConfigError(f"DeepSpeed gradient_accumulation_steps={ga} but TrainingArguments.gradient_accumulation_"
                          f"steps={args.gradient_accumulation_steps}: MAT decides at optimizer-step boundaries, which "
                          f"the Trainer sets from TrainingArguments; set \"gradient_accumulation_steps\": \"auto\"")
    return mat


class MATTrainer(Trainer):
    """``transformers.Trainer`` with Modular Adaptive Training in its DeepSpeed engine (see the module docstring).
    Extra keyword arguments: ``probe_fn(model, batch) -> Tensor[n]`` and ``probe_batch`` (dict of tensors), as in
    ``mat_ds.initialize``. ``trainer.mat``: the ``MATController`` once ``train()`` built the engine."""

    _mat_config: Optional[MATConfig] = None

    def __init__(self, *args, probe_fn: Optional[Callable] = None, probe_batch: Optional[dict] = None, **kwargs):
        self._mat_probe_fn, self._mat_probe_batch, self._next_log = probe_fn, probe_batch, {}
        super().__init__(*args, **kwargs)
        self._mat_config = check_trainer_args(self.args, self._ds_config())
        if self._mat_config is not None and self.model is not None:
            self._mat_convert(self.model)

    # -- before the engine: convert (same code path as mat_ds.initialize) -------------------------------------------
    def _ds_config(self) -> Optional[dict]:
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None) if self.is_deepspeed_enabled else None
        return plugin.deepspeed_config if plugin is not None else None

    def _mat_convert(self, model: torch.nn.Module) -> None:
        if hasattr(model, "peft_config"):
            raise ConfigError("MATTrainer does not support PEFT models (MAT freezes attention heads of the full "
                              "model): train the base model, or use transformers.Trainer")
        if any(hasattr(p, "ds_id") for p in model.parameters()):
            raise ConfigError("the model is already partitioned by ZeRO-3 (built after TrainingArguments with stage "
                              "3, under deepspeed.zero.Init): build the model before creating TrainingArguments")
        self._mat_conversion = prepare_model(model, self._ds_config(), self._mat_config)
        if self._mat_probe_fn is None and self._mat_config.needs_probe:
            self._mat_probe_fn = self._mat_conversion.probe_fn(model, self._mat_config)  # fails here, not at step 0

    def call_model_init(self, trial=None):
        model = super().call_model_init(trial)
        if self._mat_config is not None:  # hyper-parameter search: every fresh model is converted before training
            self._mat_convert(model)
        return model

    def get_decay_parameter_names(self, model) -> list[str]:
        """HF's rule (no weight decay on biases and norms) for converted attention: the per-unit biases of
        ``HeadwiseLinear`` are named ``b{u}``, which HF's ``"bias"`` pattern would miss."""
        names = super().get_decay_parameter_names(model)
        if self._mat_config is None:
            return names
        biases = {f"{prefix}.{n}" if prefix else n for prefix, m in model.named_modules()
                  if isinstance(m, HeadwiseLinear) for n, p in m.named_parameters(recurse=False)
                  if any(p is b for b in m.bias_params())}
        return [n for n in names if n not in biases]

    # -- right after deepspeed.initialize (inside accelerator.prepare): attach the controller -----------------------
    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        prepare = self.accelerator.prepare

        def prepare_and_attach(*objs, **kwargs):
            out = prepare(*objs, **kwargs)
            for obj in out if isinstance(out, tuple) else (out,):
                self._mat_attach(obj)
            return out

        self.accelerator.prepare = prepare_and_attach

    def _mat_attach(self, engine) -> None:
        from deepspeed.runtime.engine import DeepSpeedEngine

        if self._mat_config is None or not isinstance(engine, DeepSpeedEngine) or engine.optimizer is None \
                or getattr(engine, "mat", None) is not None:
            return  # no MAT, not an engine, an inference (evaluation) engine, or already attached
        if engine.gradient_accumulation_steps() != self.args.gradient_accumulation_steps:
            ga = self.args.gradient_accumulation_steps
            raise ConfigError(f"the DeepSpeed engine accumulates {engine.gradient_accumulation_steps()} micro-batches "
                              f"but TrainingArguments.gradient_accumulation_steps={ga}: set "
                              f"\"gradient_accumulation_steps\": \"auto\" in the DeepSpeed JSON")
        attach(engine, self.model, self._mat_config, self._mat_conversion, self._mat_probe_fn, self._mat_probe_batch)

    @property
    def mat(self) -> Optional[MATController]:
        """The engine's ``MATController`` (None before ``train()`` built the engine, or without MAT)."""
        return getattr(self.model_wrapped, "mat", None)

    # -- logging -----------------------------------------------------------------------------------------------------
    def log_next(self, values: dict) -> None:
        """Values (e.g. from a callback's ``on_step_end``) merged into the next training log entry."""
        self._next_log.update(values)

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        if self.mat is not None and "loss" in logs:  # a training log entry (not eval, not the final summary)
            logs.update(self.mat.metrics())
            logs.update(self._next_log)
            self._next_log = {}
        super().log(logs, start_time)


__all__ = ["MATTrainer", "check_trainer_args"]
