"""Adapter: Hugging Face LLaMA-style decoders (grouped-query attention) -> head-wise projections, MAT unit = KV group.

Layout in transformers 5.x (``models/llama/modeling_llama.py``; Mistral and Qwen2 are the same code), per decoder
layer ``model.layers.N.self_attn`` (``LlamaAttention`` / ``MistralAttention`` / ``Qwen2Attention``):

* ``q_proj``: ``nn.Linear(d, H·k)``; ``k_proj`` / ``v_proj``: ``nn.Linear(d, H_kv·k)``; ``o_proj``:
  ``nn.Linear(H·k, d)``. ``k = head_dim`` (may differ from d/H, e.g. Mistral's explicit ``head_dim``).
* Bias: none for LLaMA/Mistral by default; LLaMA with ``attention_bias=True`` has a bias on all four; Qwen2 has a bias
  on q/k/v but not o. A q/k/v bias slice belongs to its unit; o_proj's bias is shared (added after the heads sum).
* Query head h reads KV head ``h // r`` with ``r = H / H_kv`` (``repeat_kv`` = ``repeat_interleave`` on the head
  axis; SDPA's ``enable_gqa`` is the same mapping). So KV group g's query heads are the CONTIGUOUS q_proj rows
  ``[g·r·k, (g+1)·r·k)``, and the o_proj input columns of those heads are the same range.

Why the unit is one KV group (q heads g·r..(g+1)·r-1 + K and V head g + their o_proj columns), i.e. n_units = H_kv on
all four projections with contiguous layouts: a unit must own whole parameters so it can be frozen (and drop out of
ZeRO's gradient reduction) without splitting a tensor another trainable unit still needs. K/V head g is shared by r
query heads: freezing one query head alone would leave a shared K/V head half "frozen", and freezing K/V head g alone
would change what all r query heads see while they still train. The group is the smallest set of attention
parameters closed under that sharing. With H_kv = H (plain multi-head attention) r = 1 and a unit is one head.

MLP units (``convert_mlp``): the gated MLP's ``gate_proj`` and ``up_proj`` (``nn.Linear(d, F)``, split "out", the
same channels: act(gate)·up is element-wise) and ``down_proj`` (``nn.Linear(F, d)``, split "in"), found
structurally in every decoder layer (LLaMA, Mistral, Qwen2/Qwen3, Gemma2 name them alike; a Qwen2-MoE layer's
``shared_expert`` is such an MLP too, its routed experts are the ``hf_moe`` adapter's).

Attention modules are found structurally (``q_proj``/``k_proj``/``v_proj``/``o_proj`` linears plus ``head_dim``);
head counts come from the attention's config (``num_attention_heads``, ``num_key_value_heads``). The forward path
only calls the four projections (no ``.weight`` reads). Verified on ``LlamaForCausalLM`` (with and without
``attention_bias``, GQA and MHA), ``MistralForCausalLM`` and ``Qwen2ForCausalLM``. Families with per-head extras
(Qwen3's q/k RMSNorm over head_dim) keep head locality but are not verified here; fused ``qkv_proj`` variants
(Phi-3) do not match.
"""
from __future__ import annotations

from typing import Iterator, Optional

from torch import nn

from mat_ds.core.headwise import HeadwiseLinear, swap_in

from .mlp import convert_projections, layer_of

PROJS = ("q_proj", "k_proj", "v_proj", "o_proj")

# Tensor parallelism (mat_ds/core/tensor_parallel.py): a TP rank's attention holds KV groups [r·H_kv/tp, ...) and
# runs unchanged on them: the forward views q/k/v as (-1, head_dim) and takes num_key_value_groups = H / H_kv (the
# same on every rank), so nothing in the module must be told its local head count; the MLP (act(gate)·up, then down)
# is element-wise in its hidden channels, so MLP units shard the same way. (The unit kinds offered under TP.)
TENSOR_PARALLEL = ("heads", "mlp")


def _is_proj(m: Optional[nn.Module]) -> bool:
    # Converted projections still count: matches() and the layer numbering stay stable across convert() calls.
    return isinstance(m, (nn.Linear, HeadwiseLinear))


def _attention_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Self-attention modules in module order: one per decoder layer."""
    for name, m in model.named_modules():
        if isinstance(getattr(m, "head_dim", None), int) and all(_is_proj(getattr(m, p, None)) for p in PROJS):
            yield name, m


def matches(model: nn.Module) -> bool:
    return next(_attention_modules(model), None) is not None


def _head_side(m: nn.Module, split: str) -> int:
    """Width of the head-indexed side: outputs of q/k/v, inputs of o (converted or not)."""
    if isinstance(m, HeadwiseLinear):
        return m.d_out if split == "out" else m.d_in
    return m.out_features if split == "out" else m.in_features


def _heads(model: nn.Module, attn: nn.Module) -> tuple[int, int, int]:
    """(H, H_kv, head_dim), checked against the projection shapes."""
    cfg = getattr(attn, "config", None) or model.config
    H = cfg.num_attention_heads
    H_kv = getattr(cfg, "num_key_value_heads", None) or H  # None in some configs means plain MHA
    k = attn.head_dim
    dims = {p: _head_side(getattr(attn, p), "in" if p == "o_proj" else "out") for p in PROJS}
    want = {"q_proj": H * k, "k_proj": H_kv * k, "v_proj": H_kv * k, "o_proj": H * k}
    if H % H_kv or dims != want:
        raise ValueError(f"unexpected attention shapes {dims} for H={H}, H_kv={H_kv}, head_dim={k}")
    return H, H_kv, k


def _swap(attn: nn.Module, attr: str, n_units: int, split: str, layer: int) -> bool:
    # Contiguous layout on every projection: group g = q rows [g·r·k, (g+1)·r·k), k/v rows [g·k, (g+1)·k),
    # o_proj input columns [g·r·k, (g+1)·r·k).
    return swap_in(attn, attr, lambda old: HeadwiseLinear.from_linear(old, n_units, split, layer=layer))


def convert(model: nn.Module) -> int:
    """Replace q/k/v/o_proj of every self-attention with HeadwiseLinear, n_units = H_kv (one unit per KV group),
    ``layer`` = attention index in module order. Returns the number of layers converted now (0 if already done)."""
    converted = 0
    for layer, (_, attn) in enumerate(_attention_modules(model)):
        _, H_kv, _ = _heads(model, attn)
        changed = [_swap(attn, p, H_kv, "in" if p == "o_proj" else "out", layer) for p in PROJS]
        converted += any(changed)
    return converted


MLP_PROJS = ("gate_proj", "up_proj", "down_proj")


def _mlp_blocks(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, m in model.named_modules():
        if all(_is_proj(getattr(m, p, None)) for p in MLP_PROJS):
            yield name, m


def convert_mlp(model: nn.Module, groups: int) -> int:
    """Every gated MLP -> head-wise linears of kind "mlp" (``groups`` units, gate and up rows alike)."""
    attention = [name for name, _ in _attention_modules(model)]
    converted = 0
    for name, mlp in _mlp_blocks(model):
        converted += convert_projections([(mlp, "gate_proj", "out"), (mlp, "up_proj", "out"),
                                          (mlp, "down_proj", "in")], groups, layer_of(name, attention),
                                         where=f"{name}.")
    return converted


def objective(model: nn.Module) -> str:
    """Decoder-only: always next-token prediction."""
    return "causal_lm"
