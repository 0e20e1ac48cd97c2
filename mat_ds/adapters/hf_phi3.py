"""Adapter: Hugging Face Phi-3 (fused ``qkv_proj``, grouped-query attention) -> head-wise projections, MAT unit = KV
group.

Layout in transformers 5.x (``models/phi3/modeling_phi3.py``), per decoder layer ``model.layers.N.self_attn``
(``Phi3Attention``, ``k = head_dim``, ``r = H / H_kv``):

* ``qkv_proj``: ``nn.Linear(d, (H + 2·H_kv)·k)``, no bias, BLOCKED ``[Q (H·k) | K (H_kv·k) | V (H_kv·k)]``: the
  forward slices ``qkv[..., :H·k]``, ``[H·k : (H+H_kv)·k]``, ``[(H+H_kv)·k :]`` and views each block as
  ``[..., heads, k]``. Query head h reads KV head ``h // r`` (``repeat_kv``, as in LLaMA).
* ``o_proj``: ``nn.Linear(H·k, d)``, no bias, on the concatenated (head-major) query heads.

The unit is one KV group g, for the reason ``hf_llama`` gives (the smallest set of attention parameters closed under
the K/V sharing): query heads g·r..(g+1)·r-1, KV head g and their o_proj columns. In the fused ``qkv_proj`` that is
three runs of output channels, q rows ``[g·r·k, (g+1)·r·k)``, k rows ``H·k + [g·k, (g+1)·k)``, v rows
``(H+H_kv)·k + [g·k, (g+1)·k)``: one non-contiguous ``split="out"`` layout of shape [H_kv, (r+2)·k]
(``qkv_layout``). ``o_proj``: ``split="in"``, H_kv contiguous units (columns ``[g·r·k, (g+1)·r·k)``). With
H_kv = H (multi-head) r = 1 and a unit is one head, the layout GPT-2's blocked ``c_attn`` has.

Rotary (``partial_rotary_factor``, LongRoPE scaling alike) acts on the head_dim axis of each head's q and k with
position-only cos/sin, and ``sliding_window`` only masks positions: both keep head locality. The forward path only
calls the two projections (no ``.weight`` reads); ``Phi3PreTrainedModel`` has no ``_init_weights`` of its own.
Attention modules are found structurally (``qkv_proj``/``o_proj`` linears, an int ``head_dim`` and
``num_key_value_heads``; shapes checked against the config's ``num_attention_heads``/``num_key_value_heads``).
``q/k/v_proj`` models (``hf_llama``) do not match, nor do CodeGen / MiniMax-lightning ``qkv_proj`` + ``out_proj``
(different fused layouts). Verified on ``Phi3ForCausalLM`` (GQA and MHA); Phi-4-multimodal's text attention is the
same code but not verified here. Phi-3's fused MLP ``gate_up_proj`` is not converted.
"""
from __future__ import annotations

import copy
from typing import Iterator

import torch
from torch import nn

from mat_ds.core.headwise import HeadwiseLinear, blocked_layout, linear_dims, swap_in

# Tensor parallelism (mat_ds/core/tensor_parallel.py): a TP rank holds KV groups [r·H_kv/tp, ...); its local
# qkv_proj keeps the full layer's channel order, i.e. [Q_r | K_r | V_r], blocked like the whole. The forward slices
# it at ``self.config.num_attention_heads · head_dim`` and ``self.num_key_value_heads · head_dim``, so each attention
# module is given its rank's counts (``localize_heads``: a private copy of the config with H/tp and H_kv/tp; the
# model's own config is untouched). num_key_value_groups = H / H_kv is the same on every rank. MLP units are not
# offered (Phi-3's fused gate_up_proj is not converted); AutoTP shards gate_up_proj (its GateUpPack layer) and
# down_proj as it does without MAT.
TENSOR_PARALLEL = ("heads",)


def _attention_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Self-attention modules (``Phi3Attention``-like) in module order: one per decoder layer."""
    for name, m in model.named_modules():
        k, h_kv = getattr(m, "head_dim", None), getattr(m, "num_key_value_heads", None)
        if not isinstance(k, int) or not isinstance(h_kv, int):
            continue
        qkv, o = linear_dims(getattr(m, "qkv_proj", None)), linear_dims(getattr(m, "o_proj", None))
        if qkv is not None and o is not None and qkv[1] == o[0] + 2 * h_kv * k and o[0] % k == 0:
            yield name, m


def matches(model: nn.Module) -> bool:
    return next(_attention_modules(model), None) is not None


def _heads(model: nn.Module, attn: nn.Module) -> tuple[int, int, int]:
    """(H, H_kv, head_dim), checked against the projection shapes."""
    cfg = getattr(attn, "config", None) or model.config
    H = cfg.num_attention_heads
    H_kv = getattr(cfg, "num_key_value_heads", None) or H
    k = attn.head_dim
    qkv, o = linear_dims(attn.qkv_proj), linear_dims(attn.o_proj)
    if H % H_kv or H_kv != attn.num_key_value_heads or qkv[1] != (H + 2 * H_kv) * k or o[0] != H * k:
        raise ValueError(f"unexpected attention shapes qkv_proj {qkv}, o_proj {o} for H={H}, H_kv={H_kv}, "
                         f"head_dim={k}")
    return H, H_kv, k


def qkv_layout(n_heads: int, n_kv_heads: int, head_dim: int) -> torch.Tensor:
    """[H_kv, (r+2)·k]: KV group g owns q rows [g·r·k, (g+1)·r·k), k rows H·k + [g·k, (g+1)·k) and v rows
    (H+H_kv)·k + [g·k, (g+1)·k) of the blocked [Q | K | V] ``qkv_proj`` output."""
    return blocked_layout([n_heads * head_dim, n_kv_heads * head_dim, n_kv_heads * head_dim], n_kv_heads)


def convert(model: nn.Module) -> int:
    """Replace every self-attention's ``qkv_proj`` / ``o_proj`` with HeadwiseLinear, n_units = H_kv (one unit per KV
    group), ``layer`` = attention index in module order. Returns the number of layers converted now (0 if done)."""
    converted = 0
    for layer, (_, attn) in enumerate(_attention_modules(model)):
        H, H_kv, k = _heads(model, attn)
        layout = qkv_layout(H, H_kv, k)
        changed = (
            swap_in(attn, "qkv_proj",
                    lambda old: HeadwiseLinear.from_linear(old, H_kv, "out", layout=layout, layer=layer)),
            swap_in(attn, "o_proj", lambda old: HeadwiseLinear.from_linear(old, H_kv, "in", layer=layer)),
        )
        converted += any(changed)
    return converted


def objective(model: nn.Module) -> str:
    """Decoder-only: always next-token prediction."""
    return "causal_lm"


def localize_heads(model: nn.Module) -> None:
    """Under TP (after ``core.tensor_parallel.shard_model`` and ``deepspeed.initialize``): each self-attention computes
    with its rank's head counts, read off its local head-wise shapes (H_kv = local units of ``qkv_proj``, H = the
    local ``o_proj`` input width / head_dim), so it is idempotent and overrides whatever AutoTP set. A no-op for an
    unsharded model."""
    for m in model.modules():
        qkv, o = getattr(m, "qkv_proj", None), getattr(m, "o_proj", None)
        if not isinstance(qkv, HeadwiseLinear) or not isinstance(o, HeadwiseLinear) or qkv.n_units == qkv.units_total:
            continue
        cfg = copy.copy(m.config)  # private to this module: the model's config keeps the global counts
        cfg.num_attention_heads, cfg.num_key_value_heads = o.d_in // m.head_dim, qkv.n_units
        m.config, m.num_key_value_heads = cfg, qkv.n_units
