"""A user's own causal LM, laid out like Megatron-Core's GPT, as a user would bring it to mat_ds under tensor
parallelism: mark the attention with ``mat_ds.make_headwise`` and register a ``FamilySpec`` that says the forward
runs on a TP rank's share of the units (``tensor_parallel=("heads",)``); AutoTP shards the MLP by a
``partition_config`` in the JSON, as DeepSpeed needs for any model it has no preset or HF tp_plan for.

Per layer: ``linear_qkv`` fused with its rows interleaved per query group (``[groups, (r + 2)·k]``: a group's r query
heads, then its K and V head; Megatron-Core's layout), ``linear_proj`` on the concatenated heads, and an MLP
``linear_fc1`` / ``linear_fc2``. The attention reads the group count from the shapes (``view(..., -1, (r+2)·k)``), so
nothing has to be told its rank's counts. tests/scripts/tp_check.py runs it as family ``own``.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

import mat_ds

PARTITION_CONFIG = {"use_default_specs": False, "layer_specs": [
    {"patterns": [r".*\.linear_fc1\.weight$", r".*\.linear_fc1\.bias$"], "partition_type": "column"},
    {"patterns": [r".*\.linear_fc2\.weight$"], "partition_type": "row"},
]}


class MegatronStyleLM(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, groups: int, ffn: int, seq: int):
        super().__init__()
        self.k, self.r = d // heads, heads // groups
        self.embed = nn.Embedding(vocab, d)
        self.pos_embed = nn.Embedding(seq, d)
        self.layers = nn.ModuleList(nn.ModuleDict({
            "norm1": nn.LayerNorm(d), "linear_qkv": nn.Linear(d, groups * (self.r + 2) * self.k),
            "linear_proj": nn.Linear(heads * self.k, d), "norm2": nn.LayerNorm(d),
            "linear_fc1": nn.Linear(d, ffn), "linear_fc2": nn.Linear(ffn, d)}) for _ in range(layers))
        self.norm_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, input_ids, labels=None):
        B, T = input_ids.shape
        x = self.embed(input_ids) + self.pos_embed(torch.arange(T, device=input_ids.device))
        k, r = self.k, self.r
        for b in self.layers:
            qkv = b["linear_qkv"](b["norm1"](x)).view(B, T, -1, (r + 2) * k)  # [B, T, groups on this rank, ...]
            q, key, v = qkv.split([r * k, k, k], dim=-1)
            q = q.reshape(B, T, -1, k).transpose(1, 2)  # query head g·r + j reads group g
            key, v = (t.transpose(1, 2).repeat_interleave(r, dim=1) for t in (key, v))
            a = F.scaled_dot_product_attention(q, key, v, is_causal=True)
            x = x + b["linear_proj"](a.transpose(1, 2).reshape(B, T, -1))
            x = x + b["linear_fc2"](F.gelu(b["linear_fc1"](b["norm2"](x))))
        logits = self.lm_head(self.norm_f(x))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        return SimpleNamespace(loss=loss, logits=logits)


def convert(model: nn.Module) -> int:
    """The user's marking: one call per layer; units = query groups (contiguous rows of linear_qkv)."""
    for layer in range(len(model.layers)):
        groups = model.layers[layer]["linear_proj"].in_features // (model.r * model.k)
        mat_ds.make_headwise(model, layer=layer, out_proj=[f"layers.{layer}.linear_qkv"],
                             in_proj=[f"layers.{layer}.linear_proj"], n_units=groups)
    return len(model.layers)


SPEC = mat_ds.FamilySpec(name="megatron_style_lm", matches=lambda m: isinstance(m, MegatronStyleLM), convert=convert,
                         objective=lambda m: "causal_lm", tensor_parallel=("heads",))
