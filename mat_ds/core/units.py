"""What the core needs from a model: its MAT units. This is the whole model interface of mat_ds's core.

A model is MAT-ready when it contains

* ``HeadwiseLinear`` modules (``mat_ds/core/headwise.py``) tagged with their transformer layer (``layer=l``). Unit u
  of layer l ("L{l}H{u}", kind ``heads``) is part u of every head-wise linear tagged l: e.g. its Q/K/V rows and its
  columns of the output projection. The adapters (``mat_ds/adapters/``) convert known families in place; for any
  other model, build attention with ``HeadwiseLinear`` or convert its projections with ``mat_ds.make_headwise``;
* and/or ``deepspeed.moe.layer.MoE`` layers: expert e of the layer in transformer layer l is unit "L{l}E{e}" (kind
  ``experts``), see ``mat_ds/core/experts.py``;
* and/or per-expert experts modules (``mat_ds/core/fused_experts.py`` protocol: ``mat_expert_params()``, ``layer``,
  ``mat_recorder``; ``mat_ds/adapters/hf_moe.py`` converts HF fused experts, e.g. Mixtral): expert e is "L{l}E{e}" too.

Unit order (the index every policy mask, Gram tensor and checkpoint uses): attention units by (layer, u), then
experts by (MoE layer in module order, global expert id): deepspeed.moe layers first, then protocol experts
modules. A unit's ``params`` are what THIS rank holds: an expert that another expert-parallel rank holds has
``params == []``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .config import ConfigError
from .experts import MoELayer, find_moe_layers
from .fused_experts import find_fused_expert_layers
from .headwise import HeadwiseLinear, headwise_layers

KINDS = ("heads", "experts")


@dataclass
class Unit:
    kind: str  # "heads" or "experts"
    layer: int  # transformer layer
    index: int  # unit within the layer (heads) or global expert id (experts)
    params: list = field(default_factory=list)  # nn.Parameters on this rank

    @property
    def name(self) -> str:
        return f"L{self.layer}{'H' if self.kind == 'heads' else 'E'}{self.index}"


@dataclass
class ModelUnits:
    """The units of one model, found once (after conversion, before ``deepspeed.initialize``)."""

    heads: list[Unit]
    experts: list[Unit]
    attention_layers: dict[int, list[HeadwiseLinear]]  # layer tag -> its head-wise linears
    moe_layers: list[MoELayer]
    fused_expert_layers: list = field(default_factory=list)  # protocol experts modules (fused_experts.py)

    def of_kind(self, kind: str) -> list[Unit]:
        return self.heads if kind == "heads" else self.experts

    def all(self) -> list[Unit]:
        return self.heads + self.experts

    @property
    def heads_per_layer(self) -> int:
        return len(self.heads) // max(len(self.attention_layers), 1)


def find_units(model: nn.Module) -> ModelUnits:
    """Scan ``model`` for head-wise linears and MoE layers; check that each layer's head-wise linears agree."""
    by_layer: dict[int, list[HeadwiseLinear]] = {}
    for m in headwise_layers(model):
        if m.layer is None:
            raise ConfigError(f"a HeadwiseLinear ({m.extra_repr()}) has no layer tag: construct it with layer=<index>")
        by_layer.setdefault(int(m.layer), []).append(m)
    heads: list[Unit] = []
    for layer in sorted(by_layer):
        mods = by_layer[layer]
        counts = {m.n_units for m in mods}
        if len(counts) != 1:
            raise ConfigError(f"layer {layer}: its head-wise linears have different unit counts {sorted(counts)}; "
                              f"unit u must mean the same head in every projection of a layer")
        for u in range(mods[0].n_units):
            heads.append(Unit("heads", layer, u, [p for m in mods for p in m.unit_params(u)]))
    moe = find_moe_layers(model)
    experts = [Unit("experts", layer.layer, e, params)
               for layer in moe for e, params in enumerate(layer.expert_params())]
    fused = find_fused_expert_layers(model)
    experts += [Unit("experts", int(m.layer), e, list(params))
                for m in fused for e, params in enumerate(m.mat_expert_params())]
    return ModelUnits(heads, experts, by_layer, moe, fused)
