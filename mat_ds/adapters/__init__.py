"""Model-family adapters: convert a model the user already trains into one whose attention units are head-wise.

``convert_model(model)`` (called by ``mat_ds.initialize``; call it yourself first if you build optimizer parameter
groups by hand) tries each family in order and converts IN PLACE, keeping the function (logits equal to 1e-6 in fp32,
tested per family). Each family module exports ``matches(model)``, ``convert(model) -> layers converted`` and
``objective(model) -> "masked_lm" | "causal_lm"``; the project's own Transformer also offers a layer path (RaPTr).

* ``own``: mat_ds's Transformer (already head-wise).
* ``hf_bert``: BERT-style separate Q/K/V/O ``nn.Linear`` with biases.
* ``hf_gpt2``: GPT-2 ``Conv1D`` ``c_attn`` (blocked [Q|K|V]) + ``c_proj``.
* ``hf_llama``: LLaMA/Mistral-style ``q/k/v/o_proj`` with grouped KV heads (unit = KV group).
* ``hf_neox``: GPT-NeoX/Pythia fused ``query_key_value`` (per head [q|k|v], unit = head) + ``dense``.
* ``hf_phi3``: Phi-3 fused ``qkv_proj`` (blocked [Q|K|V], grouped KV heads, unit = KV group) + ``o_proj``.

MLP blocks (``convert_model(model, mlp_groups=G)``, which ``mat_ds.initialize`` passes when ``"mlp"`` is in
``mat.modules``): the attention family's ``convert_mlp(model, G)`` turns each dense MLP into head-wise linears of
kind "mlp" (``mlp.py``). A family without it, or a model without dense MLPs, converts none (``initialize`` then
stops with a one-line error).

Converted IN ADDITION to the (first matching) attention family above:

* ``hf_moe``: HF fused MoE experts (Mixtral, Qwen2/3-MoE, OLMoE, ...: ``gate_up_proj`` [E, 2F, d]) -> one module per
  expert (unit = expert). ``Conversion.family`` stays the attention family (``hf_moe`` if none matched).

Any other model: ``make_headwise`` converts named ``nn.Linear`` projections of one layer yourself (README, "Your own
model"); ``deepspeed.moe`` experts need no conversion.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

from torch import nn

from ..core.config import ConfigError, MATConfig
from ..core.headwise import HeadwiseLinear, blocked_layout, headwise_layers, swap_in
from ..core.probe import hf_probe_fn
from .spec import BUILTIN, FamilySpec, register_family, resolve

FAMILIES = tuple(name for name in BUILTIN if name != "hf_moe")  # attention families (disjoint matches)


@dataclass
class Conversion:
    """What ``convert_model`` did: the family, and old parameter -> new parameters for remapping optimizer groups."""

    spec: Optional[FamilySpec]  # the family, resolved once (None: user-made head-wise layers / MoE experts only)
    replaced: dict = field(default_factory=dict)  # id(old param) -> [new params]
    # ids of head-wise parameters that tensor parallelism placed on OTHER ranks (core/tensor_parallel.py): dropped
    # from parameter lists, which may name them (a list taken after conversion, or a remapped one)
    dropped: set = field(default_factory=set)

    @property
    def family(self) -> Optional[str]:
        return self.spec.name if self.spec is not None else None

    def remap(self, model_parameters):
        """Replace the unconverted model's parameters by their head-wise pieces (this rank's, under tensor
        parallelism), in lists or param-group dicts."""
        if not self.replaced and not self.dropped:
            return model_parameters
        items = list(model_parameters)

        def swap(params: Iterable) -> list:
            return [q for p in params for q in self.replaced.get(id(p), [p]) if id(q) not in self.dropped]

        if items and isinstance(items[0], dict):
            return [{**g, "params": swap(g["params"])} for g in items]
        return swap(items)

    def probe_fn(self, model: nn.Module, cfg: MATConfig) -> Callable:
        if self.spec is not None and self.spec.probe_fn is not None:
            return self.spec.probe_fn(cfg)
        if self.spec is None or self.spec.objective is None:
            raise ConfigError(f"mat_ds does not know the training objective of {type(model).__name__}: pass "
                              f"probe_fn=(model, batch) -> per-sample scalar [n] to mat_ds.initialize")
        return hf_probe_fn(self.spec.objective(model), cfg.probe_output, cfg.seed)

    def tensor_parallel_kinds(self) -> tuple:
        """The unit kinds whose modules run on a TP rank's share of the units, as the family's adapter declares
        (``TENSOR_PARALLEL``: its forward reads head counts from the projection shapes, not the config); ()."""
        return self.spec.tensor_parallel if self.spec is not None else ()

    def layer_path(self, model: nn.Module):
        return self.spec.layer_path(model) if self.spec is not None and self.spec.layer_path is not None else None


def convert_model(model: nn.Module, mlp_groups: Optional[int] = None) -> Conversion:
    """Convert ``model`` in place (idempotent). ``mlp_groups``: also convert its dense MLP blocks, with that many MAT
    units per layer (None: MLPs stay as they are). See the module docstring."""
    before = {name: p for name, p in model.named_parameters()}
    attention, extra = resolve(model)  # THE family lookup (adapters/spec.py)
    for spec in ([attention] if attention is not None else []) + extra:
        spec.convert(model)
        if mlp_groups is not None and spec.convert_mlp is not None:
            spec.convert_mlp(model, mlp_groups)
    after = dict(model.named_parameters())
    return Conversion(attention or (extra[0] if extra else None), _replacements(before, after))


def _replacements(before: dict, after: dict) -> dict:
    """Old ``prefix.weight`` -> new ``prefix.w{u}``; old ``prefix.bias`` -> ``prefix.b{u}`` or ``prefix.bias``;
    old ``prefix.leaf`` -> ``prefix.{e}.leaf`` (per-expert pieces of a fused expert parameter, ``hf_moe``)."""
    gone = {name: p for name, p in before.items() if name not in after or after[name] is not p}
    out = {}
    for name, p in gone.items():
        prefix, _, leaf = name.rpartition(".")
        stem = "w" if leaf == "weight" else "b"
        new = [q for n, q in after.items() if n.rpartition(".")[0] == prefix
               and (n.rpartition(".")[2] == leaf or (n.rpartition(".")[2][:1] == stem
                                                     and n.rpartition(".")[2][1:].isdigit()))]
        if not new:
            new = [q for n, q in after.items() if n.startswith(prefix + ".") and n.rpartition(".")[2] == leaf
                   and n[len(prefix) + 1:].rpartition(".")[0].isdigit()]
        if new:
            out[id(p)] = new
    return out


def make_headwise(model: nn.Module, layer: int, out_proj: list[str], in_proj: list[str], n_units: int,
                  kind: str = "heads", blocks: Optional[dict[str, Sequence[int]]] = None) -> None:
    """Mark one transformer layer of YOUR model for MAT: convert its attention projections (``nn.Linear`` submodules
    named by their qualified names) in place. ``out_proj``: projections whose OUTPUT channels belong to units (Q, K, V;
    unit u = channels [u·k, (u+1)·k)); ``in_proj``: projections whose INPUT channels do (the output projection).
    ``n_units``: heads (or KV groups) of the layer. Call it for every layer before ``mat_ds.initialize``.

    ``kind="mlp"`` marks an MLP block instead: ``out_proj`` its up (and gate) projections, ``in_proj`` its down
    projection, ``n_units`` groups of its hidden channels (select them with ``"modules": ["heads", "mlp"]``).

    Fused projections: a fused QKV whose rows are interleaved PER UNIT (Megatron-Core's ``linear_qkv``, rows
    ``[groups, (r + 2)·k]``; GPT-NeoX's ``query_key_value``) needs nothing: unit u owns a contiguous block of rows. A
    fused projection made of BLOCKS (``[Q | K | V]`` as in GPT-2 or Phi-3, or ``[gate | up]``) is named in ``blocks``
    with its block widths, e.g. ``blocks={"attn.qkv": [H * k, H_kv * k, H_kv * k]}``: unit u owns part u of every
    block (``headwise.blocked_layout``)."""
    if kind not in ("heads", "mlp"):
        raise ConfigError(f"make_headwise: kind={kind!r} is not one of 'heads', 'mlp'")
    blocks = dict(blocks or {})
    stray = sorted(set(blocks) - set(out_proj))
    if stray:
        raise ConfigError(f"make_headwise: blocks names {stray}, which are not in out_proj (only projections whose "
                          f"output channels belong to units can be blocked)")
    for names, split in ((out_proj, "out"), (in_proj, "in")):
        for qual in names:
            parent_name, _, attr = qual.rpartition(".")
            try:
                parent = model.get_submodule(parent_name) if parent_name else model
                lin = getattr(parent, attr)
            except AttributeError:
                raise ConfigError(f"make_headwise: {type(model).__name__} has no submodule {qual!r}") from None
            if isinstance(lin, HeadwiseLinear):
                continue
            if not isinstance(lin, nn.Linear):
                raise ConfigError(f"make_headwise: {qual} is a {type(lin).__name__}, expected nn.Linear")
            layout = None
            try:
                if qual in blocks:
                    widths = [int(w) for w in blocks[qual]]
                    if sum(widths) != lin.out_features:
                        raise ValueError(f"block widths {widths} sum to {sum(widths)}, the projection has "
                                         f"{lin.out_features} outputs")
                    layout = blocked_layout(widths, n_units)
                swap_in(parent, attr, lambda old: HeadwiseLinear.from_linear(old, n_units, split, layout=layout,
                                                                             layer=layer, kind=kind))
            except ValueError as exc:
                raise ConfigError(f"make_headwise: {qual}: {exc}") from None


__all__ = ["Conversion", "FAMILIES", "FamilySpec", "convert_model", "headwise_layers", "make_headwise",
           "register_family"]
