"""Adapter: Hugging Face BERT-style encoders -> head-wise attention projections (MAT units = attention heads).

Layout in transformers 5.x (``models/bert/modeling_bert.py``), per encoder layer ``...encoder.layer.N``:

* ``attention`` (``BertAttention``) holds ``self`` (``BertSelfAttention``) and ``output`` (``BertSelfOutput``).
* ``attention.self.{query,key,value}``: ``nn.Linear(d, H·k)`` with bias. The forward views the output as
  ``[..., H, k]``, so head h is output channels ``[h·k, (h+1)·k)`` -> ``split="out"``, H contiguous units, one bias
  slice per unit (a head's bias belongs to that head only, so it freezes with it).
* ``attention.output.dense``: ``nn.Linear(H·k, d)`` applied to the concatenated heads -> ``split="in"``, H contiguous
  units; its bias is added after the heads are summed, so it is shared (one ``bias`` parameter, always trained).

All four are called as ``self.query(x)`` etc.; no forward path reads ``.weight`` directly, so swapping the submodules
is enough. Decoder configs with ``add_cross_attention`` also have ``crossattention`` (``BertCrossAttention``, its keys
and values come from the encoder): it is NOT converted, MAT units are self-attention heads only.

MLP units (``convert_mlp``, ``"mlp"`` in ``mat.modules``): the ``BertLayer`` that holds an attention block has
``intermediate.dense`` (``nn.Linear(d, F)`` + bias, then the activation: split "out") and ``output.dense``
(``nn.Linear(F, d)``, then dropout, residual and LayerNorm: split "in", shared bias).

Attention modules are found structurally (an object with ``.self.{query,key,value}`` and ``.output.dense`` that is not
cross-attention), so the same adapter applies to copies of this layout. Verified (function and gradients) on
``BertForMaskedLM``, ``BertLMHeadModel`` and ``RobertaForMaskedLM``; ELECTRA/XLM-R use the identical classes
(copied code) but are not exercised by the tests.
"""
from __future__ import annotations

from typing import Iterator, Optional

from torch import nn

from mat_ds.core.headwise import HeadwiseLinear, swap_in

from .mlp import convert_projections, layer_of

QKV = ("query", "key", "value")

# Tensor parallelism (mat_ds/core/tensor_parallel.py): BertSelfAttention's forward views q/k/v as (-1, head_size)
# and reshapes the context to (-1), so a TP rank's attention runs unchanged on its heads. MLP units are not offered
# under TP: BERT has no HF tp_plan, and DeepSpeed's heuristic layer parser (module_inject/auto_tp.py ``tp_parser``)
# asserts when a layer keeps no nn.Linear for it to shard, which is what converting the MLP too leaves.
TENSOR_PARALLEL = ("heads",)


def _is_proj(m: Optional[nn.Module]) -> bool:
    # A converted projection still counts, so matches()/layer numbering stay stable across repeated convert() calls.
    return isinstance(m, (nn.Linear, HeadwiseLinear))


def _attention_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Self-attention blocks (``BertAttention``-like) in module order: one per encoder layer."""
    for name, m in model.named_modules():
        sa, out = getattr(m, "self", None), getattr(m, "output", None)
        if not isinstance(sa, nn.Module) or not isinstance(out, nn.Module):
            continue
        if not all(_is_proj(getattr(sa, p, None)) for p in QKV) or not _is_proj(getattr(out, "dense", None)):
            continue
        # Cross-attention (decoder configs) reads encoder states: not a unit of this layer's self-attention.
        if getattr(m, "is_cross_attention", False) or "Cross" in type(sa).__name__:
            continue
        yield name, m


def matches(model: nn.Module) -> bool:
    return next(_attention_modules(model), None) is not None


def _num_heads(model: nn.Module, sa: nn.Module) -> int:
    cfg = getattr(sa, "config", None) or model.config  # the attention's own (sub)config if it keeps one
    n = cfg.num_attention_heads
    if getattr(sa, "num_attention_heads", n) != n:
        raise ValueError(f"attention module has {sa.num_attention_heads} heads, config says {n}")
    return n


def _swap(parent: nn.Module, attr: str, n_units: int, split: str, layer: int) -> bool:
    return swap_in(parent, attr, lambda old: HeadwiseLinear.from_linear(old, n_units, split, layer=layer))


def convert(model: nn.Module) -> int:
    """Replace every self-attention's query/key/value/output.dense with HeadwiseLinear (H units, ``layer`` = index of
    the attention block in module order). Returns the number of layers converted now (0 if already converted)."""
    converted = 0
    for layer, (_, attn) in enumerate(_attention_modules(model)):
        H = _num_heads(model, attn.self)
        changed = [_swap(attn.self, p, H, "out", layer) for p in QKV]
        changed.append(_swap(attn.output, "dense", H, "in", layer))
        converted += any(changed)
    return converted


def _mlp_blocks(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``BertLayer``-like modules: ``intermediate.dense`` and ``output.dense`` linears next to an ``attention``."""
    for name, m in model.named_modules():
        inter, out = getattr(m, "intermediate", None), getattr(m, "output", None)
        if isinstance(getattr(m, "attention", None), nn.Module) and _is_proj(getattr(inter, "dense", None)) \
                and _is_proj(getattr(out, "dense", None)):
            yield name, m


def convert_mlp(model: nn.Module, groups: int) -> int:
    """Every layer's feed-forward block -> head-wise linears of kind "mlp" with ``groups`` units, tagged with the
    layer of the attention block beside it. Returns the number of blocks converted now."""
    attention = [name for name, _ in _attention_modules(model)]
    converted = 0
    for name, block in _mlp_blocks(model):
        layer = layer_of(name + ".intermediate", attention)
        converted += convert_projections([(block.intermediate, "dense", "out"), (block.output, "dense", "in")],
                                         groups, layer, where=f"{name}.intermediate/output.")
    return converted


def objective(model: nn.Module) -> str:
    """``masked_lm`` for MLM/pre-training heads and plain encoders; ``causal_lm`` for BERT used as a decoder
    (``BertLMHeadModel``, ``is_decoder=True``)."""
    name = type(model).__name__
    if "MaskedLM" in name or "PreTraining" in name:
        return "masked_lm"
    if "CausalLM" in name or "LMHead" in name or getattr(model.config, "is_decoder", False):
        return "causal_lm"
    return "masked_lm"
