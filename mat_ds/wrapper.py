"""``mat_ds.initialize``: ``deepspeed.initialize`` with Modular Adaptive Training running inside the engine.

    engine, optimizer, dataloader, lr_scheduler = mat_ds.initialize(model=model, config="ds.json")
    loss = engine(**batch).loss; engine.backward(loss); engine.step()      # the user's loop, unchanged

What happens, in order:

1. the ``"mat"`` block of the config is read and validated (``MATConfig``). No block, or ``"enabled": false``: the
   call IS ``deepspeed.initialize`` (same arguments, same return values, nothing converted or hooked);
2. the model is converted in place (``mat_ds/adapters``): attention projections of known families become head-wise
   linears; already head-wise layers and ``deepspeed.moe`` experts are used as they are. ``model_parameters`` given
   as a list (or param groups) of the unconverted model's parameters are remapped to the converted ones;
3. ``deepspeed.initialize`` builds the engine with EVERYTHING trainable (a parameter frozen at initialize never
   enters DeepSpeed's optimizer, so it could never come back);
4. a ``MATController`` is attached as ``engine.mat``. It runs inside the engine through one forward pre-hook: at
   the first training forward of every optimizer step (the step boundary; never inside gradient accumulation) it
   collects probe samples until the probe set is full, and on refresh steps measures λmax
   (``mntk.probe_units``), lets each kind's policy decide on rank 0, broadcasts the decision and freezes
   (``freezing.FreezeController``). ``engine.save_checkpoint``/``load_checkpoint`` carry MAT's state in the client
   state under ``"mat"`` (λ history, frozen sets, policy and probe set); after a ZeRO-3 universal load
   (``"checkpoint": {"load_universal": true}``) the optimizer's param groups are mended (``universal.repair_loads``).

Per-step metrics: ``engine.mat.metrics()`` (``mat/`` keys; λmax per unit on refresh steps). When DeepSpeed's monitor
is enabled (``"wandb"``/``"tensorboard"``/``"csv_monitor"`` blocks) they are written there too, at ``global_samples``.
"""
from __future__ import annotations

from typing import Callable, Optional

import deepspeed
import torch

from . import universal
from .adapters import convert_model
from .core.config import ConfigError, MATConfig, load_config
from .core.engine import MATController
from .core.tensor_parallel import check_autotp_plan, check_tensor_parallel, shard_model
from .core.topology import autotp_size, ensure_tp_groups
from .core.units import ModelUnits, find_units


def initialize(args=None, model: Optional[torch.nn.Module] = None, optimizer=None, model_parameters=None,
               training_data=None, lr_scheduler=None, config=None, *, probe_batch: Optional[dict] = None,
               probe_fn: Optional[Callable] = None, mat_config: Optional[MATConfig] = None, **deepspeed_kwargs):
    """``deepspeed.initialize`` plus MAT (see the module docstring). Returns ``(engine, optimizer, dataloader,
    lr_scheduler)`` exactly like DeepSpeed; the engine has ``engine.mat`` when MAT is enabled.

    ``probe_batch``: the fixed probe set (dict of tensors, n rows, same on every rank); default: the first
    ``mat.probe_samples`` training samples the engine sees. ``probe_fn(model, batch) -> Tensor[n]``: the per-sample
    scalar f_i; default: the model family's masked/causal LM loss from logits + labels (``mat_ds/core/probe.py``).
    ``mat_config``: the config's ``"mat"`` block already parsed by the caller (the project's trainer parses it once
    and hands it on); otherwise it is parsed here.
    """
    if model is None:
        raise ConfigError("mat_ds.initialize needs model=")
    if config is None and args is not None and getattr(args, "deepspeed_config", None):
        config = args.deepspeed_config
    ds_config = load_config(config) if config is not None else None
    mat = mat_config if mat_config is not None else MATConfig.from_dict((ds_config or {}).get("mat"))
    if not mat.enabled:
        return deepspeed.initialize(args=args, model=model, optimizer=optimizer, model_parameters=model_parameters,
                                    training_data=training_data, lr_scheduler=lr_scheduler, config=config,
                                    **deepspeed_kwargs)
    conversion = prepare_model(model, ds_config, mat)
    if model_parameters is not None:
        model_parameters = conversion.remap(model_parameters)
    if probe_fn is None and mat.needs_probe:
        probe_fn = conversion.probe_fn(model, mat)
    engine, opt, loader, sched = deepspeed.initialize(args=args, model=model, optimizer=optimizer,
                                                      model_parameters=model_parameters,
                                                      training_data=training_data, lr_scheduler=lr_scheduler,
                                                      config=ds_config, **deepspeed_kwargs)
    attach(engine, model, mat, conversion, probe_fn, probe_batch)
    return engine, opt, loader, sched


def prepare_model(model: torch.nn.Module, ds_config: Optional[dict], mat: MATConfig):
    """Steps 1-2 of ``initialize``, BEFORE the engine exists: convert ``model`` in place, check it has MAT units and
    that ``ds_config`` can run MAT. Returns the adapters' ``Conversion``. Shared with ``mat_ds.hf_trainer``."""
    conversion = convert_model(model, mlp_groups=mat.mlp_groups if "mlp" in mat.modules else None)
    units = find_units(model)
    if "mlp" in mat.modules and not units.mlp:
        raise ConfigError(
            f"mat.modules has 'mlp' but mat_ds found no MLP blocks to convert in {type(model).__name__} (families with "
            f"MLP units: mat_ds Transformer, HF BERT, GPT-2, LLaMA/Mistral/Qwen2/Qwen3/Gemma2): remove 'mlp', or mark "
            f"your MLP with mat_ds.make_headwise(..., kind='mlp') before mat_ds.initialize")
    if not units.heads and not units.experts and not units.mlp:
        raise ConfigError(
            f"mat_ds found no attention units or deepspeed.moe experts in {type(model).__name__} (families it "
            f"converts: mat_ds Transformer, HF BERT, GPT-2, LLaMA/Mistral/Qwen2, NeoX, Phi-3): mark your own model's "
            f"attention with mat_ds.make_headwise(model, layer=..., out_proj=[...], in_proj=[...], n_units=...) before "
            f"mat_ds.initialize (README: 'Your own model')")
    check_supported(ds_config, mat, units)
    tp = autotp_size(ds_config)
    if tp > 1:
        # AutoTP will shard the nn.Linear layers inside deepspeed.initialize; the head-wise ones are ours to shard,
        # now, before DeepSpeed's optimizer sees them (core/tensor_parallel.py says why).
        stage = int(((ds_config or {}).get("zero_optimization") or {}).get("stage", 0))
        check_tensor_parallel(model, tp, stage, bool(units.experts), conversion.tensor_parallel_kinds(),
                              conversion.family)
        check_autotp_plan(model, (ds_config or {}).get("tensor_parallel") or {})
        group, tp_rank, tp_size = ensure_tp_groups(tp)
        conversion.dropped |= shard_model(model, tp_rank, tp_size, group)
    return conversion


def attach(engine, model: torch.nn.Module, mat: MATConfig, conversion, probe_fn: Optional[Callable] = None,
           probe_batch: Optional[dict] = None) -> "MATController":
    """Step 4 of ``initialize``, right AFTER ``deepspeed.initialize`` built ``engine`` around the converted ``model``
    (``prepare_model``): attach the ``MATController`` as ``engine.mat`` and return it. Shared with
    ``mat_ds.hf_trainer``."""
    if probe_fn is None and mat.needs_probe:
        probe_fn = conversion.probe_fn(model, mat)
    if conversion.spec is not None and conversion.spec.localize_heads is not None:
        # After deepspeed.initialize: AutoTP rewrites head-count attributes of every module above a sharded
        # parameter (``AutoTP.update_mp_params``), ours included; the family sets its own, from the local shapes.
        conversion.spec.localize_heads(model)
    # ep_rank is known only now that DeepSpeed created the expert groups: list the experts' local params again.
    engine.mat = MATController(engine, mat, find_units(model), probe_fn, probe_batch, conversion.layer_path(model))
    universal.repair_loads(engine)  # DeepSpeed 0.19.8's ZeRO-3 universal loader, mended after every such load
    return engine.mat


def check_supported(ds_config: Optional[dict], mat: MATConfig, units: ModelUnits) -> None:
    """Configurations MAT cannot run, said up front in one line (never a traceback from deep inside DeepSpeed)."""
    cfg = ds_config or {}
    zero = cfg.get("zero_optimization", {}) or {}
    stage = int(zero.get("stage", 0))
    if units.moe_layers and stage == 3:
        raise ConfigError("the model has deepspeed.moe experts, which DeepSpeed does not support under ZeRO stage 3: "
                          "use zero_optimization.stage 2 (or 0/1) for MoE models")
    if units.experts and stage == 3:
        raise ConfigError("MAT on Hugging Face fused-expert MoE models is verified on ZeRO stages 0-2 only, not "
                          "under ZeRO-3: use zero_optimization.stage 2 for this model")
    for key in ("fp16", "bf16"):  # DeepSpeed's own check is a ValueError traceback from inside the engine
        if (cfg.get(key) or {}).get("enabled") is True:
            from deepspeed.accelerator import get_accelerator

            accel = get_accelerator()
            if not (accel.is_fp16_supported() if key == "fp16" else accel.is_bf16_supported()):
                other = "bf16 or fp32" if key == "fp16" else "fp32"
                raise ConfigError(f"{key} is not supported by DeepSpeed's {accel.device_name()} accelerator on this "
                                  f"machine: remove the \"{key}\" block or train in {other}")
    for key in ("offload_optimizer", "offload_param"):
        device = (zero.get(key) or {}).get("device", "none")
        if device not in (None, "none") and mat.freezes:
            raise ConfigError(f"zero_optimization.{key} (ZeRO-Offload) is not supported with MAT freezing yet: remove "
                              f"it, or use policy 'full'")
