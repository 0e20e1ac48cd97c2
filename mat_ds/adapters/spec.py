"""The model-family spec: everything mat_ds needs to know about a family, resolved ONCE per model.

``convert_model`` asks the registry which family a model belongs to (``resolve``), converts it with that spec and
keeps the spec in the ``Conversion`` it returns; the facade then reads the training objective, the default probe,
the tensor-parallel support and the RaPTr layer path from the spec (never from the family module again). A family
is one file: a module with ``matches`` / ``convert`` / ``objective`` (plus, optionally, ``convert_mlp``,
``TENSOR_PARALLEL``, ``localize_heads``, ``probe_fn``, ``LayerPath``), registered here by name, or a ``FamilySpec`` a user registers
with ``register_family`` for a model mat_ds does not know.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Optional

from torch import nn

from ..core.config import ConfigError


@dataclass(frozen=True)
class FamilySpec:
    """One model family (its adapter's answers, bound once)."""

    name: str
    """Registry name (``Conversion.family``, README's families table)."""
    matches: Callable[[nn.Module], bool]
    """True for a model of this family (families match disjoint sets of models)."""
    convert: Callable[[nn.Module], int]
    """Convert the attention projections in place to head-wise linears (idempotent); returns layers converted."""
    objective: Optional[Callable[[nn.Module], str]] = None
    """The training objective, ``"masked_lm"`` or ``"causal_lm"``, for the default probe (None: the user must pass
    ``probe_fn``)."""
    convert_mlp: Optional[Callable[[nn.Module, int], int]] = None
    """Convert the dense MLP blocks into ``G`` MLP units per layer (None: the family has no MLP units)."""
    tensor_parallel: tuple = ()
    """Unit kinds whose modules run on a TP rank's share of the units (``core/tensor_parallel.py``); () = the
    family is refused under AutoTP."""
    localize_heads: Optional[Callable[[nn.Module], None]] = None
    """Under TP, after mat_ds sharded the head-wise layers (``core/tensor_parallel.py``): tell each attention module
    the head counts of ITS rank, for families whose forward reads them from the config rather than from the
    projection shapes (Phi-3). None: the forward needs nothing (LLaMA, BERT, NeoX)."""
    probe_fn: Optional[Callable] = None
    """``(MATConfig) -> probe_fn`` overriding the objective-based default (mat_ds's own Transformer)."""
    layer_path: Optional[Callable] = None
    """``(model) -> LayerPath`` for RaPTr (None: the family has no layer path)."""
    additional: bool = False
    """Converted ON TOP of the attention family that matched (e.g. HF fused MoE experts), not instead of it."""


BUILTIN = ("own", "hf_bert", "hf_gpt2", "hf_llama", "hf_neox", "hf_phi3", "hf_moe")  # adapters/<name>.py
_REGISTRY: dict[str, FamilySpec] = {}


def _from_module(name: str) -> Optional[FamilySpec]:
    try:
        mod = importlib.import_module(f"{__package__}.{name}")
    except ImportError as exc:  # a family whose library is missing (e.g. transformers) cannot match anyway
        if "transformers" in str(exc):
            return None
        raise
    return FamilySpec(name=name, matches=mod.matches, convert=mod.convert, objective=getattr(mod, "objective", None),
                      convert_mlp=getattr(mod, "convert_mlp", None),
                      tensor_parallel=tuple(getattr(mod, "TENSOR_PARALLEL", ())),
                      localize_heads=getattr(mod, "localize_heads", None),
                      probe_fn=getattr(mod, "probe_fn", None), layer_path=getattr(mod, "LayerPath", None),
                      additional=bool(getattr(mod, "ADDITIONAL", False)))


def register_family(spec: FamilySpec) -> None:
    """Make ``spec`` known to ``convert_model`` / ``mat_ds.initialize`` (checked after the built-in families)."""
    if spec.name in BUILTIN:
        raise ConfigError(f"register_family: {spec.name!r} is a built-in family name; choose another")
    _REGISTRY[spec.name] = spec


def registered() -> list[FamilySpec]:
    """Every family spec, built-ins first (those whose library is installed), then the user's in order."""
    out = [spec for name in BUILTIN if (spec := _builtin(name)) is not None]
    return out + [spec for name, spec in _REGISTRY.items() if name not in BUILTIN]


_BUILT: dict[str, Optional[FamilySpec]] = {}


def _builtin(name: str) -> Optional[FamilySpec]:
    if name not in _BUILT:
        _BUILT[name] = _from_module(name)
    return _BUILT[name]


def resolve(model: nn.Module) -> tuple[Optional[FamilySpec], list[FamilySpec]]:
    """(the attention family of ``model`` or None, the additional families that also match): THE one lookup."""
    attention = [s for s in registered() if not s.additional and s.matches(model)]
    if len(attention) > 1:
        raise ConfigError(f"{type(model).__name__} matches several model families "
                          f"{[s.name for s in attention]}: a registered family's matches() must be specific")
    extra = [s for s in registered() if s.additional and s.matches(model)]
    return (attention[0] if attention else None), extra
