"""Adapter: Hugging Face GPT-NeoX (Pythia) -> head-wise attention projections (MAT units = attention heads).

Layout in transformers 5.x (``models/gpt_neox/modeling_gpt_neox.py``), per layer ``gpt_neox.layers.N.attention``
(``GPTNeoXAttention``, ``head_size = d / H``):

* ``query_key_value``: ``nn.Linear(d, 3d)`` (bias iff ``attention_bias``, default True). Its output is viewed as
  ``[B, T, H, 3k]`` and each head's ``3k`` slice is chunked into q, k, v (``qkv.view(..., -1, 3 * head_size)
  .transpose(1, 2).chunk(3, dim=-1)``): head h owns the CONTIGUOUS output channels ``[h·3k, (h+1)·3k)`` (its q, then
  k, then v). Head-interleaved, unlike GPT-2's blocked [Q | K | V], so the default contiguous ``split="out"`` layout
  with H units is exactly right (no custom ``layout``); a bias slice belongs to its head.
* ``dense``: ``nn.Linear(d, d)`` on the concatenated heads (head-major, ``attn_output.reshape(*input_shape, -1)``)
  -> ``split="in"``, H contiguous units; its bias (``attention_bias``) is added after the heads sum: shared.

Rotary (``rotary_pct`` -> ``rope_parameters["partial_rotary_factor"]``) acts on the first ``rotary_ndims`` channels
of each head's q and k (``apply_rotary_pos_emb`` slices the last, head_dim, axis; cos/sin depend on the position only),
so it mixes channels within a head, never across heads: head locality holds for any ``rotary_pct``. The parallel
residual (``use_parallel_residual``) is outside the attention and does not matter.

Checked in 5.x: the forward path only calls ``self.query_key_value(x)`` / ``self.dense(x)`` (eager, SDPA and the
other attention interfaces alike); ``GPTNeoXPreTrainedModel`` has no ``_init_weights`` of its own touching them.
Attention modules are found structurally (``query_key_value`` (d -> 3d) and ``dense`` (d -> d) linears plus an int
``head_size`` with d = H·head_size); H comes from the config (``num_attention_heads``). Verified on
``GPTNeoXForCausalLM`` (with and without ``attention_bias``, full and partial rotary) and on
``GPTNeoXJapaneseForCausalLM`` (same per-head [q | k | v] layout; its ``dense`` has no bias, the separate
``dense_bias`` parameter is added by the layer and stays as it is). Look-alikes with a ``head_dim`` attribute instead
(BLOOM, Persimmon, Falcon ``query_key_value``) do not match.
"""
from __future__ import annotations

from typing import Iterator

from torch import nn

from mat_ds.core.headwise import HeadwiseLinear, linear_dims, swap_in

# Tensor parallelism (mat_ds/core/tensor_parallel.py): head h's q, k and v are ONE contiguous block of
# query_key_value's rows, so a TP rank's heads are a contiguous row range of it, and the forward views the output as
# (-1, 3·head_size) and the context as (-1): a TP rank's attention runs unchanged on its heads. MLP units are not
# offered (no MLP conversion for NeoX); AutoTP shards dense_h_to_4h / dense_4h_to_h as it does without MAT.
TENSOR_PARALLEL = ("heads",)


def _attention_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Self-attention modules (``GPTNeoXAttention``-like) in module order: one per layer."""
    for name, m in model.named_modules():
        if not isinstance(getattr(m, "head_size", None), int):
            continue
        qkv, dense = linear_dims(getattr(m, "query_key_value", None)), linear_dims(getattr(m, "dense", None))
        if qkv is not None and dense is not None and qkv == (qkv[0], 3 * qkv[0]) and dense == (qkv[0], qkv[0]):
            yield name, m


def matches(model: nn.Module) -> bool:
    return next(_attention_modules(model), None) is not None


def _heads(model: nn.Module, attn: nn.Module) -> int:
    """H, checked against head_size and the projection shapes."""
    cfg = getattr(attn, "config", None) or model.config
    H, k = cfg.num_attention_heads, attn.head_size
    d = linear_dims(attn.dense)[0]
    if H * k != d:
        raise ValueError(f"unexpected attention shapes: d={d}, num_attention_heads={H}, head_size={k}")
    return H


def _swap(attn: nn.Module, attr: str, n_units: int, split: str, layer: int) -> bool:
    # Contiguous layout on both: head h = query_key_value rows [h·3k, (h+1)·3k), dense input columns [h·k, (h+1)·k).
    return swap_in(attn, attr, lambda old: HeadwiseLinear.from_linear(old, n_units, split, layer=layer))


def convert(model: nn.Module) -> int:
    """Replace every attention's ``query_key_value`` / ``dense`` with HeadwiseLinear (H units, ``layer`` = attention
    index in module order). Returns the number of layers converted now (0 if already converted)."""
    converted = 0
    for layer, (_, attn) in enumerate(_attention_modules(model)):
        H = _heads(model, attn)
        changed = (_swap(attn, "query_key_value", H, "out", layer), _swap(attn, "dense", H, "in", layer))
        converted += any(changed)
    return converted


def objective(model: nn.Module) -> str:
    """Decoder-only: always next-token prediction."""
    return "causal_lm"
