"""mat_ds's own Transformer (``mat_ds/models/transformer.py``): already head-wise, nothing to convert.

Its per-sample probe output uses the model's sparse-prediction loss (logits only at target positions), and it is the
one family with a layer path for RaPTr (skipped layers are the identity and cost nothing). MLP units
(``convert_mlp``): each dense block's ``fc1`` (split "out") and ``fc2`` (split "in"); Switch (MoE) blocks have
experts instead and are left alone.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..core.config import MATConfig
from ..core.probe import per_sample_output
from ..models.transformer import Transformer
from .mlp import convert_projections


def matches(model: nn.Module) -> bool:
    return isinstance(model, Transformer)


def convert(model: nn.Module) -> int:
    return 0  # built head-wise (HeadwiseLinear with layer tags)


def convert_mlp(model: Transformer, groups: int) -> int:
    """Dense blocks' ``fc1``/``fc2`` -> head-wise linears of kind "mlp" (``groups`` units, layer = block index)."""
    converted = 0
    for layer, block in enumerate(model.blocks):
        if block.switch is None:
            converted += convert_projections([(block, "fc1", "out"), (block, "fc2", "in")], groups, layer,
                                             where=f"blocks.{layer}.")
    return converted


def objective(model: Transformer) -> str:
    return "causal_lm" if model.causal else "masked_lm"


def probe_fn(cfg: MATConfig) -> Callable[[nn.Module, dict], torch.Tensor]:
    def fn(model: Transformer, batch: dict) -> torch.Tensor:
        if cfg.probe_output == "loss":
            return model(batch["input_ids"], batch["labels"], per_sample=True)
        # Targets are shifted inside token_targets for GPT, so the logits are read as masked-LM style here.
        return per_sample_output(model.logits(batch["input_ids"]), model.token_targets(batch["labels"]),
                                 causal=False, probe_output=cfg.probe_output, seed=cfg.seed)
    return fn


class LayerPath:
    """RaPTr's handle on the model: which layers run, and each layer's parameters that are not unit parameters."""

    def __init__(self, model: Transformer):
        self.model = model
        self.n_layers = model.cfg.n_layer

    def bodies(self) -> list[list[nn.Parameter]]:
        return self.model.layer_bodies()

    def set_active(self, active: list[bool]) -> None:
        self.model.active_layers = list(active)
