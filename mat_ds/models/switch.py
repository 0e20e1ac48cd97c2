"""Switch-Transformer MLPs on DeepSpeed's MoE layer, with experts as MAT modules.

A block whose index ``l`` satisfies ``(l + 1) % moe_layer_interval == 0`` replaces its dense MLP by
``deepspeed.moe.layer.MoE`` (top-1 routing, capacity factor, DeepSpeed's load-balancing loss ``l_aux``, random token
selection when an expert overflows). Expert ``e`` of that layer is one MAT unit: its parameters are the expert
MLP's ``fc1``/``fc2`` weights and biases. With expert parallelism (``moe_ep_size > 1``) a rank holds only
``num_experts / ep_size`` of them ("local experts"); global expert ``e`` lives on expert-parallel rank
``e // num_local_experts``. Launch (2 ranks, 4 experts per MoE layer split over both ranks):

    deepspeed --num_gpus 2 --module mat_ds.pretrain --deepspeed_config configs/switch_mat_ep2.json \\
        --moe_num_experts 4 --moe_ep_size 2

Choices made here (DeepSpeed leaves them to the model):

* Expert initialisation: DeepSpeed deep-copies ONE expert module ``num_local_experts`` times, so all experts would
  start identical. We re-initialise every local expert from a generator seeded by (run seed, layer, GLOBAL expert
  index), so expert ``e`` has the same initial weights whatever ``ep_size`` is, and experts differ from each other.
* Expert-parallel rank: DeepSpeed's default E+D topology (no tensor/pipeline parallelism) puts ranks
  ``[k·ep, (k+1)·ep)`` in one expert-parallel group, i.e. ep_rank = rank % ep_size. The model is built before
  ``deepspeed.initialize`` creates the groups, so we compute it that way (``tests/scripts/moe_check.py`` checks it
  against DeepSpeed's groups afterwards).
* The training loss is the LM loss + ``moe_aux_loss_coef · Σ_layers l_aux``; ``train/loss`` logs the LM part only
  (comparable with dense runs), ``train/aux_loss`` the balancing term.

The per-expert mNTK (routing recovery, probe-mode routing without token dropping) is model-agnostic and lives in
``mat_ds/core/experts.py``: it works on any model's ``deepspeed.moe`` layers, this one included.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, ModelConfig
from ..core.headwise import init_std_for_residual
from ..core.topology import Topology, distributed


class ExpertMLP(nn.Module):
    """One expert: the dense block's MLP shape (d -> d_ff -> d, GELU)."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))

    def init_weights(self, gen: torch.Generator, n_layer: int) -> None:
        with torch.no_grad():
            self.fc1.weight.copy_(torch.randn(self.fc1.weight.shape, generator=gen) * 0.02)
            self.fc2.weight.copy_(torch.randn(self.fc2.weight.shape, generator=gen) * init_std_for_residual(n_layer))
            self.fc1.bias.zero_()
            self.fc2.bias.zero_()


def expert_parallel_rank(ep_size: int) -> int:
    """This rank's index in its expert-parallel group under DeepSpeed's default E+D topology."""
    if ep_size == 1:
        return 0
    if not distributed():
        raise ConfigError(f"moe_ep_size={ep_size} needs the distributed launcher (deepspeed --num_gpus N)")
    whole = Topology.current()
    if whole.world % ep_size:
        raise ConfigError(f"moe_ep_size={ep_size} must divide the number of ranks ({whole.world})")
    return whole.rank % ep_size


class SwitchMLP(nn.Module):
    """A block's MLP as a DeepSpeed MoE layer; remembers its last ``l_aux`` and per-expert token counts."""

    def __init__(self, cfg: ModelConfig, layer: int, seed: int):
        super().__init__()
        from deepspeed.moe.layer import MoE

        E, ep = cfg.moe_num_experts, cfg.moe_ep_size
        self.layer, self.num_experts, self.ep_size = layer, E, ep
        self.ep_rank = expert_parallel_rank(ep)
        self.moe = MoE(hidden_size=cfg.d_model, expert=ExpertMLP(cfg.d_model, cfg.d_ff), num_experts=E, ep_size=ep,
                       k=1, capacity_factor=cfg.moe_capacity_factor,
                       eval_capacity_factor=cfg.moe_eval_capacity_factor, min_capacity=cfg.moe_min_capacity,
                       drop_tokens=True, use_rts=True)
        self.num_local_experts = self.moe.num_local_experts
        for i, expert in enumerate(self.local_experts()):
            gen = torch.Generator().manual_seed(seed * 1_000_003 + layer * 1_009 + self.global_index(i))
            expert.init_weights(gen, cfg.n_layer)
        self.l_aux: torch.Tensor | None = None
        self.exp_counts: torch.Tensor | None = None

    def local_experts(self) -> list[ExpertMLP]:
        return list(self.moe.deepspeed_moe.experts.deepspeed_experts)

    def global_index(self, local: int) -> int:
        return self.ep_rank * self.num_local_experts + local

    @property
    def gate(self):
        return self.moe.deepspeed_moe.gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, l_aux, counts = self.moe(x)
        self.l_aux, self.exp_counts = l_aux, counts
        return out


def switch_layers(model: nn.Module) -> list[SwitchMLP]:
    return [m for m in model.modules() if isinstance(m, SwitchMLP)]
