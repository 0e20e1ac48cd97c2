"""Adapter: Hugging Face GPT-2 -> head-wise attention projections (MAT units = attention heads).

Layout in transformers 5.x (``models/gpt2/modeling_gpt2.py``), per block ``transformer.h.N``:

* ``attn`` (``GPT2Attention``) with ``c_attn``: ``transformers.pytorch_utils.Conv1D(3d, d)``, a transposed linear
  (weight [d, 3d], ``y = x W + b``). Its output is split as ``[Q | K | V]`` (``.split(d, dim=2)``) and each block is
  viewed as ``[..., H, k]``, so head h owns channels ``g·d + h·k + [0, k)`` of blocks g = 0 (Q), 1 (K), 2 (V): one
  non-contiguous ``split="out"`` layout, ``layout[h] = cat_g(g·d + h·k + arange(k))``, one bias slice per head.
* ``attn.c_proj``: ``Conv1D(d, d)`` on the concatenated heads -> ``split="in"``, H contiguous units, shared bias.

Because both are one module each, a GPT-2 layer has exactly two head-wise linears whose unit h is head h.

MLP units (``convert_mlp``): ``mlp.c_fc`` (``Conv1D(F, d)``, split "out") and ``mlp.c_proj`` (``Conv1D(d, F)``,
split "in", shared bias) of every block.

Checked in 5.x: the forward path only calls ``self.c_attn(x)`` / ``self.c_proj(x)`` (eager, SDPA and the
``reorder_and_upcast_attn`` path alike), so swapping the submodules is enough. The ONLY direct ``.weight`` access is
``GPT2PreTrainedModel._init_weights`` (``module.c_proj.weight`` for ``GPT2Attention``, the scaled residual init): it
runs at construction/``from_pretrained``, i.e. before conversion. After conversion ``model.init_weights()`` is a no-op
in 5.x (modules are flagged initialised), but calling ``model._init_weights(attn)`` directly raises AttributeError
(HeadwiseLinear has no ``.weight``): do not re-initialise a converted model, re-initialise before converting.
Cross-attention blocks (``add_cross_attention``: ``crossattention`` with ``q_attn`` and a [K | V] ``c_attn``) are not
converted. Look-alikes with a different fused layout are rejected: ``c_attn`` must be a ``Conv1D`` with 3d outputs
(e.g. GPT-BigCode's multi-query ``nn.Linear`` [Q(d) | K(k) | V(k)] does not match). Verified on ``GPT2LMHeadModel``.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from mat_ds.core.headwise import HeadwiseLinear, blocked_layout, swap_in

from .mlp import convert_projections, layer_of


def _is_conv1d(m) -> bool:
    # By type name: transformers' Conv1D (weight [d_in, d_out]); no import of transformers needed to test for it.
    return isinstance(m, nn.Module) and type(m).__name__ == "Conv1D" and m.weight.dim() == 2


def _qkv_ok(m, d: int) -> bool:
    if _is_conv1d(m):
        return m.weight.shape == (d, 3 * d)
    return isinstance(m, HeadwiseLinear) and (m.d_in, m.d_out) == (d, 3 * d)  # already converted


def _proj_ok(m, d: int) -> bool:
    if _is_conv1d(m):
        return m.weight.shape == (d, d)
    return isinstance(m, HeadwiseLinear) and (m.d_in, m.d_out) == (d, d)


def _attention_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Self-attention modules (``GPT2Attention``-like, not cross-attention) in module order: one per block."""
    for name, m in model.named_modules():
        d = getattr(m, "embed_dim", None)
        if not isinstance(d, int) or getattr(m, "is_cross_attention", False) or hasattr(m, "q_attn"):
            continue
        if _qkv_ok(getattr(m, "c_attn", None), d) and _proj_ok(getattr(m, "c_proj", None), d):
            yield name, m


def matches(model: nn.Module) -> bool:
    return next(_attention_modules(model), None) is not None


def qkv_layout(d: int, n_heads: int) -> torch.Tensor:
    """[H, 3k]: head h owns channels h·k..(h+1)·k of each of the Q, K and V blocks of ``c_attn``'s output."""
    return blocked_layout([d, d, d], n_heads)


def _swap(parent: nn.Module, attr: str, n_units: int, split: str, layout, layer: int) -> bool:
    return swap_in(parent, attr,
                   lambda old: HeadwiseLinear.from_conv1d(old, n_units, split, layout=layout, layer=layer))


def convert(model: nn.Module) -> int:
    """Replace every block's ``attn.c_attn`` / ``attn.c_proj`` with HeadwiseLinear (H units, ``layer`` = block index
    in module order). Returns the number of layers converted now (0 if already converted)."""
    converted = 0
    for layer, (_, attn) in enumerate(_attention_modules(model)):
        cfg = getattr(attn, "config", None) or model.config
        H, d = cfg.num_attention_heads, attn.embed_dim  # GPT2Config maps num_attention_heads -> n_head
        if getattr(attn, "num_heads", H) != H or d % H:
            raise ValueError(f"inconsistent head count: module {getattr(attn, 'num_heads', None)}, config {H}")
        changed = (_swap(attn, "c_attn", H, "out", qkv_layout(d, H), layer),
                   _swap(attn, "c_proj", H, "in", None, layer))
        converted += any(changed)
    return converted


def _mlp_blocks(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``GPT2MLP``-like modules: ``c_fc`` and ``c_proj`` Conv1D (or converted) and no ``c_attn``."""
    for name, m in model.named_modules():
        fc, proj = getattr(m, "c_fc", None), getattr(m, "c_proj", None)
        if getattr(m, "c_attn", None) is None and all(_is_conv1d(p) or isinstance(p, HeadwiseLinear)
                                                      for p in (fc, proj)):
            yield name, m


def convert_mlp(model: nn.Module, groups: int) -> int:
    """Every block's ``mlp.c_fc`` / ``mlp.c_proj`` -> head-wise linears of kind "mlp" (``groups`` units)."""
    attention = [name for name, _ in _attention_modules(model)]
    converted = 0
    for name, mlp in _mlp_blocks(model):
        converted += convert_projections([(mlp, "c_fc", "out"), (mlp, "c_proj", "in")], groups,
                                         layer_of(name, attention), conv1d=True, where=f"{name}.")
    return converted


def objective(model: nn.Module) -> str:
    """GPT-2 is decoder-only: always next-token prediction."""
    return "causal_lm"
