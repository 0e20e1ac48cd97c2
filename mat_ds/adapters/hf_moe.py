"""Adapter: Hugging Face Mixture-of-Experts blocks with FUSED experts -> one module per expert, MAT unit = one expert.

Layout in transformers 5.x (``models/mixtral/modeling_mixtral.py``; Qwen2-MoE, Qwen3-MoE, OLMoE, PhiMoE, DeepSeek-V2/V3,
GLM4-MoE, ... carry the same experts class), per decoder layer ``model.layers.N.mlp`` (``MixtralSparseMoeBlock``):

* ``gate`` (``MixtralTopKRouter``): ``weight`` [E, d]; softmax over E logits (fp32), top-k (k =
  ``num_experts_per_tok``), Mixtral renormalises the k weights to sum 1 (Qwen2/3-MoE, OLMoE: only with
  ``norm_topk_prob``); returns ``(logits, top_k_weights [S, k], top_k_index [S, k])`` on the flattened tokens S = B·T.
* ``experts`` (``MixtralExperts``, class decorated with ``use_experts_implementation``): FUSED parameters
  ``gate_up_proj`` [E, 2F, d] and ``down_proj`` [E, d, F], no biases; ``forward(hidden_states [S, d], top_k_index,
  top_k_weights)``. Eager forward: for each expert hit, its tokens' ``gate, up = (x @ gate_up_proj[e]ᵀ).chunk(2)``,
  ``h = act(gate) * up``, ``y = h @ down_proj[e]ᵀ``, ``y *= top_k_weight``, ``out.index_add_(0, tokens, y)``
  (``config._experts_implementation`` may swap in grouped/batched GEMMs computing the same function).

Why convert: ZeRO reduces gradients per ``nn.Parameter``, and a slice of ``gate_up_proj`` cannot leave the reduction
(nor skip its weight-gradient GEMM) while the other experts train. ``PerExpertExperts`` keeps the call signature and
the function, with expert e in its own ``ExpertMLP`` (``experts.{e}.gate_up_proj`` [2F, d], ``experts.{e}.down_proj``
[d, F], copies of the fused slices). A frozen expert (``requires_grad_(False)``) computes no weight gradient (autograd
skips it) and sends none. Every expert runs on every call, also on zero tokens, so each trainable expert gets a
gradient (zeros if no token reached it) on every rank at every backward, as the fused parameter did: ZeRO's
per-parameter reduction hooks then fire in the same order on all ranks whatever the routing.

For the mNTK (``mat_ds/core/fused_experts.py``): the module implements the core's experts protocol
(``mat_expert_params``, ``layer``, ``mat_recorder``) and, while probing, records for each expert the tokens routed to it
and the (x, y) of its two linear maps. The routing the probe uses is whatever ``top_k_index`` the block's router
passed in: any router (softmax/sigmoid, grouped, renormalised or not) and any k.

Which experts modules match (``matches``): a parameter set of exactly ``gate_up_proj`` [E, 2F, d] + ``down_proj``
[E, d, F], the ``use_experts_implementation`` flags of the plain layout (concatenated [gate; up], not transposed, no
bias, gated, no post-expert norm, default ``_apply_gate``) and an eager ``forward`` whose bytecode is IDENTICAL to
``MixtralExperts``'s. In transformers 5.23 that is 54 experts classes (Mixtral, Qwen2-MoE, Qwen3-MoE, Qwen3-Next,
OLMoE, PhiMoE, DeepSeek-V2/V3, GLM4-MoE, Granite-MoE, Jamba, MiniMax, ...); GPT-OSS (biases, transposed, clamped
gate), Aria, NemotronH, DeepSeek-V4 and a few others differ and are left alone. Verified numerically (logits,
gradients, Grams; ``tests/test_hf_moe.py``): Mixtral, Qwen2-MoE (with its shared expert, which stays an ordinary
trainable MLP), Qwen3-MoE, OLMoE. Not supported: HF expert parallelism (``_is_expert_parallel``) and ZeRO-3.

The attention of these models is converted by the attention family (Mixtral/Qwen2-MoE/Qwen3-MoE/OLMoE: ``hf_llama``);
``convert_model`` runs this adapter in addition to it.
"""
from __future__ import annotations

import re
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

PLAIN_FLAGS = {"has_bias": False, "is_transposed": False, "has_gate": True, "is_concatenated": True,
               "has_post_expert_norm": False}


class ExpertMLP(nn.Module):
    """One expert: y = down_proj · (act(x gate_projᵀ) ⊙ x up_projᵀ), with gate/up stacked as in the fused layout."""

    def __init__(self, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, act_fn: nn.Module):
        super().__init__()
        self.gate_up_proj = nn.Parameter(gate_up_proj)  # [2F, d]: rows [0, F) gate, [F, 2F) up
        self.down_proj = nn.Parameter(down_proj)  # [d, F]
        self.act_fn = act_fn  # shared with the other experts (parameterless)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate_up output [m, 2F], down input h [m, F], down output [m, d]) for the m tokens ``x`` [m, d]."""
        gate_up = F.linear(x, self.gate_up_proj)
        gate, up = gate_up.chunk(2, dim=-1)
        h = self.act_fn(gate) * up
        return gate_up, h, F.linear(h, self.down_proj)


class PerExpertExperts(nn.ModuleList):
    """Drop-in replacement of a fused HF experts module: ``forward(hidden_states [S, d], top_k_index [S, k],
    top_k_weights [S, k]) -> [S, d]``, same function; ``self[e]`` is expert e (an ``ExpertMLP``)."""

    def __init__(self, experts: list[ExpertMLP], layer: int):
        super().__init__(experts)
        self.num_experts = len(experts)
        self.hidden_dim = experts[0].down_proj.shape[0]
        self.intermediate_dim = experts[0].down_proj.shape[1]
        self.layer = layer
        self.mat_recorder: Optional[list] = None  # set by mat_ds.core.fused_experts.record_fused

    @classmethod
    def from_fused(cls, fused: nn.Module, layer: int) -> "PerExpertExperts":
        gate_up, down = fused.gate_up_proj.detach(), fused.down_proj.detach()
        experts = [ExpertMLP(gate_up[e].clone(), down[e].clone(), fused.act_fn) for e in range(gate_up.shape[0])]
        for ex in experts:
            for p in ex.parameters():
                p.requires_grad_(fused.gate_up_proj.requires_grad)
        new = cls(experts, layer)
        new.train(fused.training)
        return new

    def mat_expert_params(self) -> list[list[nn.Parameter]]:
        return [[ex.gate_up_proj, ex.down_proj] for ex in self]

    def fused_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up_proj [E, 2F, d], down_proj [E, d, F]) in the original fused layout (copies), e.g. to export."""
        return (torch.stack([ex.gate_up_proj.detach() for ex in self]),
                torch.stack([ex.down_proj.detach() for ex in self]))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        final = torch.zeros_like(hidden_states)
        recorder = self.mat_recorder
        for e, expert in enumerate(self):
            # Every expert runs, also on zero tokens (see the module docstring: same gradient set on every rank).
            with torch.no_grad():
                token_idx, top_k_pos = torch.where(top_k_index == e)
            gate_up, h, y = expert(hidden_states[token_idx])
            out = y * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, out.to(final.dtype))
            if recorder is not None:
                x = hidden_states[token_idx].detach()
                recorder.append((e, token_idx, [(x, gate_up, False), (h.detach(), y, False)]))
        return final

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, hidden_dim={self.hidden_dim}, " \
               f"intermediate_dim={self.intermediate_dim}, layer={self.layer}"


def _reference_code():
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts
    return _eager_code(MixtralExperts)


def _eager_code(cls) -> Optional[tuple]:
    fwd = getattr(getattr(cls, "forward", None), "__wrapped__", None)  # the eager forward under the dispatcher
    code = getattr(fwd, "__code__", None)
    if code is None:
        return None
    consts = tuple(c for c in code.co_consts if not hasattr(c, "co_code"))
    return code.co_code, code.co_names, code.co_varnames, consts


def _flags(cls) -> dict:
    """The ``use_experts_implementation`` decorator's flags, read from the wrapped ``__init__``'s closure."""
    init = cls.__init__
    cells = dict(zip(init.__code__.co_freevars, init.__closure__ or ()))
    return {k: cells[k].cell_contents for k in PLAIN_FLAGS if k in cells}


def is_fused_experts(m: nn.Module) -> bool:
    """A fused experts module this adapter converts exactly (see the module docstring)."""
    gu, down = getattr(m, "gate_up_proj", None), getattr(m, "down_proj", None)
    if not (isinstance(gu, nn.Parameter) and isinstance(down, nn.Parameter) and gu.dim() == 3 and down.dim() == 3):
        return False
    E, two_f, d = gu.shape
    if tuple(down.shape) != (E, d, two_f // 2) or two_f % 2 or not isinstance(getattr(m, "act_fn", None), nn.Module):
        return False
    if {n for n, _ in m.named_parameters()} != {"gate_up_proj", "down_proj"}:
        return False
    if getattr(m, "_is_expert_parallel", False):
        return False
    flags = _flags(type(m))
    if any(flags.get(k, v) != v or getattr(m, k, v) != v for k, v in PLAIN_FLAGS.items()):
        return False
    try:
        from transformers.integrations.moe import _default_apply_gate
        if getattr(type(m), "_apply_gate", _default_apply_gate) is not _default_apply_gate:
            return False
        return _eager_code(type(m)) == _reference_code()
    except ImportError:
        return False


def _experts_modules(model: nn.Module):
    """(qualified name, parent, attribute, module) of every fused or converted experts module, in module order."""
    for name, parent in model.named_modules():
        for attr, child in parent.named_children():
            if isinstance(child, PerExpertExperts) or is_fused_experts(child):
                yield f"{name}.{attr}" if name else attr, parent, attr, child


def _layer_of(name: str, ordinal: int) -> int:
    numbers = re.findall(r"(?:^|\.)(\d+)(?:\.|$)", name)
    return int(numbers[0]) if numbers else ordinal


ADDITIONAL = True  # converted on top of the attention family that matched (adapters/spec.py)


def matches(model: nn.Module) -> bool:
    return next(_experts_modules(model), None) is not None


def convert(model: nn.Module) -> int:
    """Replace every fused experts module with a ``PerExpertExperts`` (``layer`` = first number in its qualified name,
    i.e. the decoder layer). Returns the number of modules converted now (0 if already done)."""
    converted = 0
    for ordinal, (name, parent, attr, child) in enumerate(list(_experts_modules(model))):
        if isinstance(child, PerExpertExperts):
            continue
        setattr(parent, attr, PerExpertExperts.from_fused(child, _layer_of(name, ordinal)))
        converted += 1
    return converted


def objective(model: nn.Module) -> str:
    """The MoE decoders these experts come from are causal LMs."""
    return "causal_lm"
