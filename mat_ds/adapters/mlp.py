"""Dense MLP blocks as MAT units (``"mlp"`` in ``mat.modules``): what every family's ``convert_mlp`` shares.

A family names its MLP projections; this module turns them into head-wise linears of ``kind="mlp"`` with
``mat.mlp_groups`` units each (``mat_ds/core/headwise.py``), so one machinery serves heads and MLP units:

* the up projection (and the gate projection of a gated MLP) is ``split="out"``: unit g owns the CONTIGUOUS hidden
  channels [g·F/G, (g+1)·F/G) and their bias entries. Contiguous because nothing downstream mixes hidden channels
  before the down projection: the activation (GELU, or SiLU(gate)·up) is element-wise, so any partition of the
  hidden channels is a valid unit, and the contiguous one keeps the fast path (one ``torch.cat`` per forward);
* the down projection is ``split="in"``: unit g owns the same channels as input columns; its bias is added after
  the groups are summed, so it is shared and always trains.

``layer_of`` numbers an MLP by the transformer layer that holds it (the attention module in the same block), so a
layer's heads and MLP units carry the same layer tag whatever the module order inside the block.
"""
from __future__ import annotations

from typing import Iterable

from torch import nn

from ..core.config import ConfigError
from ..core.headwise import HeadwiseLinear, swap_in


def layer_of(name: str, attention_names: list[str]) -> int:
    """The index of the attention module whose enclosing block (its parent's qualified name) contains module ``name``:
    the longest such block prefix wins. ConfigError if the MLP sits in no attention block."""
    best, best_len = -1, -1
    for i, attn in enumerate(attention_names):
        block = attn.rpartition(".")[0]
        if (block == "" or name == block or name.startswith(block + ".")) and len(block) > best_len:
            best, best_len = i, len(block)
    if best < 0:
        raise ConfigError(f"MLP block {name!r} is in no transformer layer with attention: mat_ds cannot number it; "
                          f"mark it yourself with mat_ds.make_headwise(..., kind='mlp', layer=...)")
    return best


def convert_projections(projs: Iterable[tuple[nn.Module, str, str]], groups: int, layer: int, conv1d: bool = False,
                        where: str = "") -> bool:
    """Swap each ``(parent, attr, split)`` projection of ONE MLP block, the up/gate ones with split "out" and the down
    one with split "in", for a head-wise linear of kind "mlp" with ``groups`` units (function unchanged). ``conv1d``:
    GPT-2's transposed ``Conv1D`` weights. Returns whether anything was replaced (False: already converted)."""
    build = HeadwiseLinear.from_conv1d if conv1d else HeadwiseLinear.from_linear
    changed = False
    for parent, attr, split in projs:
        old = getattr(parent, attr)
        if isinstance(old, HeadwiseLinear):
            if old.n_units != groups:
                raise ConfigError(f"{where}{attr} is already converted with {old.n_units} MLP units, mat.mlp_groups "
                                  f"is {groups}: convert the model once, with one mat.mlp_groups")
            continue
        width = old.weight.shape[(0 if split == "out" else 1) if not conv1d else (1 if split == "out" else 0)]
        if width % groups:
            raise ConfigError(f"mat.mlp_groups={groups} does not divide the MLP width {width} of layer {layer} "
                              f"({where}{attr}): choose a divisor of {width}")
        changed |= swap_in(parent, attr, lambda m: build(m, groups, split, layer=layer, kind="mlp"))
    return changed
