"""What the core needs from a model: its MAT units. This is the whole model interface of mat_ds's core.

A model is MAT-ready when it contains

* ``HeadwiseLinear`` modules (``mat_ds/core/headwise.py``) tagged with their transformer layer (``layer=l``). Unit u
  of layer l ("L{l}H{u}", kind ``heads``) is part u of every head-wise linear tagged l: e.g. its Q/K/V rows and its
  columns of the output projection. The adapters (``mat_ds/adapters/``) convert known families in place; for any
  other model, build attention with ``HeadwiseLinear`` or convert its projections with ``mat_ds.make_headwise``;
* and/or ``HeadwiseLinear`` modules of ``kind="mlp"``: unit g of layer l ("L{l}G{g}", kind ``mlp``) is part g of every
  MLP head-wise linear tagged l: group g of the MLP's hidden channels, i.e. its rows of the up (and gate) projection
  with their bias entries and its input columns of the down projection (whose bias is shared and always trains).
  The adapters convert MLPs only when ``"mlp"`` is in ``mat.modules`` (``mat.mlp_groups`` groups per layer);
* and/or ``deepspeed.moe.layer.MoE`` layers: expert e of the layer in transformer layer l is unit "L{l}E{e}" (kind
  ``experts``), see ``mat_ds/core/experts.py``;
* and/or per-expert experts modules (``mat_ds/core/fused_experts.py`` protocol: ``mat_expert_params()``, ``layer``,
  ``mat_recorder``; ``mat_ds/adapters/hf_moe.py`` converts HF fused experts, e.g. Mixtral): expert e is "L{l}E{e}" too.

Unit order (the index every policy mask, Gram tensor and checkpoint uses) is per kind, and the kinds come in the order
of ``KINDS``: attention units by (layer, u), MLP units by (layer, g), then experts by (MoE layer in module order, global expert id): deepspeed.moe layers first, then protocol experts
modules. A unit's ``params`` are what THIS rank holds: an expert that another expert-parallel rank holds, or a head
that another tensor-parallel rank holds (``mat_ds/core/tensor_parallel.py``), has ``params == []``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .config import ConfigError
from .experts import MoELayer, find_moe_layers
from .fused_experts import find_fused_expert_layers
from .headwise import HeadwiseLinear, headwise_layers

KINDS = ("heads", "mlp", "experts")  # THE order of unit kinds: freezer modules, probe tensors, metrics
LETTER = {"heads": "H", "mlp": "G", "experts": "E"}  # a unit's name: L{layer}{letter}{index}


@dataclass
class Unit:
    kind: str  # "heads", "mlp" or "experts"
    layer: int  # transformer layer
    index: int  # unit within the layer (heads, mlp groups) or global expert id (experts)
    params: list = field(default_factory=list)  # nn.Parameters on this rank

    @property
    def name(self) -> str:
        return f"L{self.layer}{LETTER[self.kind]}{self.index}"


@dataclass
class ModelUnits:
    """The units of one model, found once (after conversion, before ``deepspeed.initialize``)."""

    heads: list[Unit]
    experts: list[Unit]
    attention_layers: dict[int, list[HeadwiseLinear]]  # layer tag -> its head-wise linears of kind "heads"
    moe_layers: list[MoELayer]
    fused_expert_layers: list = field(default_factory=list)  # protocol experts modules (fused_experts.py)
    mlp: list[Unit] = field(default_factory=list)
    mlp_layers: dict[int, list[HeadwiseLinear]] = field(default_factory=dict)  # layer tag -> its MLP head-wise linears

    def of_kind(self, kind: str) -> list[Unit]:
        return {"heads": self.heads, "mlp": self.mlp, "experts": self.experts}[kind]

    def all(self) -> list[Unit]:
        return [u for kind in KINDS for u in self.of_kind(kind)]

    def layers_of(self, kind: str) -> dict[int, list[HeadwiseLinear]]:
        """Layer tag -> head-wise linears of a head-wise kind ("heads" or "mlp")."""
        return self.attention_layers if kind == "heads" else self.mlp_layers

    @property
    def heads_per_layer(self) -> int:
        return len(self.heads) // max(len(self.attention_layers), 1)


def _headwise_units(kind: str, by_layer: dict[int, list[HeadwiseLinear]]) -> list[Unit]:
    out: list[Unit] = []
    for layer in sorted(by_layer):
        mods = by_layer[layer]
        counts = {m.units_total for m in mods}
        if len(counts) != 1:
            what = "head" if kind == "heads" else "MLP group"
            raise ConfigError(f"layer {layer}: its {kind} head-wise linears have different unit counts "
                              f"{sorted(counts)}; unit u must mean the same {what} in every projection of a layer")
        # Tensor parallelism (core/tensor_parallel.py): this rank holds units [offset, offset + n) of every projection
        # of the layer; the others are units of this rank's table too, with params == [] (held by other TP ranks).
        local = {(m.unit_offset, m.n_units) for m in mods}
        if len(local) != 1:
            raise ConfigError(f"layer {layer}: its {kind} head-wise linears are sharded differently over "
                              f"tensor-parallel ranks {sorted(local)}; shard every projection of a layer alike")
        offset, n = local.pop()
        for u in range(counts.pop()):
            params = [p for m in mods for p in m.unit_params(u - offset)] if offset <= u < offset + n else []
            out.append(Unit(kind, layer, u, params))
    return out


def find_units(model: nn.Module) -> ModelUnits:
    """Scan ``model`` for head-wise linears and MoE layers; check that each layer's head-wise linears agree."""
    by_kind: dict[str, dict[int, list[HeadwiseLinear]]] = {"heads": {}, "mlp": {}}
    for m in headwise_layers(model):
        if m.layer is None:
            raise ConfigError(f"a HeadwiseLinear ({m.extra_repr()}) has no layer tag: construct it with layer=<index>")
        by_kind[getattr(m, "kind", "heads")].setdefault(int(m.layer), []).append(m)
    by_layer = by_kind["heads"]
    heads = _headwise_units("heads", by_layer)
    mlp = _headwise_units("mlp", by_kind["mlp"])
    moe = find_moe_layers(model)
    experts = [Unit("experts", layer.layer, e, params)
               for layer in moe for e, params in enumerate(layer.expert_params())]
    fused = find_fused_expert_layers(model)
    experts += [Unit("experts", int(m.layer), e, list(params))
                for m in fused for e, params in enumerate(m.mat_expert_params())]
    return ModelUnits(heads, experts, by_layer, moe, fused, mlp, by_kind["mlp"])
