"""MoE experts of ``deepspeed.moe.layer.MoE`` layers as MAT units, in ANY model: discovery, routing recovery for the
probe, and the expert-parallel bookkeeping the Gram needs.

Expert ``e`` of an MoE layer is one unit: the parameters of that expert module. With expert parallelism
(``ep_size > 1``) a rank holds only ``num_experts / ep_size`` of them ("local experts"); global expert ``e`` lives on
expert-parallel rank ``e // num_local_experts``. DeepSpeed's default E+D topology puts ranks [k·ep, (k+1)·ep) in one
expert-parallel group; the rank inside it is read from DeepSpeed's groups once they exist (after ``initialize``).

Routing recovery for the per-expert mNTK (``expert_partial_grams`` below computes the Gram from what is recorded here):
the gate's sparse routes give, for every token s of this rank, its expert ``indices[s]`` (-1 if dropped) and its slot
``locations[s]`` in that expert's capacity buffer; token s is position ``s % T`` of sample ``s // T``. An expert
receives ``[ep_size, C, d]`` slots, one slab per source rank of its expert-parallel group. The probe batch is the same
on every rank, so every source slab holds the same tokens; the expert's owner reads the slab that came from ITSELF,
whose slot -> sample map it knows locally (no communication) and whose output gradients come from its own copy of
Σ_i f_i. During the probe, token dropping is switched off (capacity = the largest expert load) so each sample's routing
depends on that sample alone and Θ is a proper per-sample Gram.

Supported: top-1 gates (Switch). An expert's parameters must all belong to ``nn.Linear`` submodules (the Gram uses the
rank-one per-slot gradients of linear maps); anything else is a one-line error at ``initialize``.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from .config import ConfigError
from .sources import RecordingSource
from .topology import rank_in, size_of


def _moe_class():
    from deepspeed.moe.layer import MoE
    return MoE


@dataclass
class MoELayer:
    """One ``deepspeed.moe.layer.MoE`` of the model and where its experts live."""

    moe: nn.Module
    name: str  # qualified module name in the model
    layer: int  # transformer layer index (first number in ``name``), for metric names L{layer}E{e}

    @property
    def num_experts(self) -> int:
        return int(self.moe.num_experts)

    @property
    def ep_size(self) -> int:
        return int(self.moe.ep_size)

    @property
    def num_local_experts(self) -> int:
        return int(self.moe.num_local_experts)

    @property
    def ep_rank(self) -> int:
        if self.ep_size == 1:
            return 0
        from deepspeed.utils import groups
        if self.moe.expert_group_name not in groups._get_expert_parallel_group_dict():
            # Before deepspeed.initialize creates the groups (mat_ds.initialize lists units once before it): DeepSpeed's
            # default E+D topology, ranks [k·ep, (k+1)·ep) form one group. Listed again from the real groups after.
            return rank_in() % self.ep_size
        return int(groups._get_expert_parallel_rank(self.moe.expert_group_name))

    @property
    def gate(self) -> nn.Module:
        return self.moe.deepspeed_moe.gate

    def local_experts(self) -> list[nn.Module]:
        return list(self.moe.deepspeed_moe.experts.deepspeed_experts)

    def global_index(self, local: int) -> int:
        return self.ep_rank * self.num_local_experts + local

    def expert_params(self) -> list[list[nn.Parameter]]:
        """Global expert index -> its parameters on this rank ([] for experts another rank holds)."""
        out: list[list[nn.Parameter]] = [[] for _ in range(self.num_experts)]
        for i, expert in enumerate(self.local_experts()):
            out[self.global_index(i)] = list(expert.parameters())
        return out

    def data_parallel_group(self):
        """The ranks that hold the same experts as this one (they reduce the experts' gradients among themselves)."""
        from deepspeed.utils import groups
        return groups._get_expert_data_parallel_group(self.moe.expert_group_name)


def find_moe_layers(model: nn.Module) -> list[MoELayer]:
    """Every ``deepspeed.moe.layer.MoE`` in module order, checked for what the probe supports."""
    try:
        MoE = _moe_class()
    except ImportError:  # pragma: no cover - deepspeed is a hard dependency
        return []
    out = []
    for ordinal, (name, mod) in enumerate((n, m) for n, m in model.named_modules() if isinstance(m, MoE)):
        numbers = re.findall(r"(?:^|\.)(\d+)(?:\.|$)", name)
        layer = MoELayer(mod, name, int(numbers[0]) if numbers else ordinal)
        k = int(getattr(layer.gate, "k", 1))
        if k != 1:
            raise ConfigError(f"MoE layer {name} routes top-{k}; mat_ds measures deepspeed.moe experts with top-1 "
                              f"(Switch) gates only: set k=1 or exclude experts with mat.modules=[\"heads\"]")
        for expert in layer.local_experts():
            in_linear = {id(p) for m in expert.modules() if isinstance(m, nn.Linear) for p in m.parameters()}
            if any(id(p) not in in_linear for p in expert.parameters()):
                raise ConfigError(f"an expert of MoE layer {name} has parameters outside nn.Linear modules; mat_ds's "
                                  f"expert mNTK covers linear experts only: use mat.modules=[\"heads\"]")
        out.append(layer)
    return out


def expert_linears(expert: nn.Module) -> list[nn.Linear]:
    return [m for m in expert.modules() if isinstance(m, nn.Linear)]


@contextlib.contextmanager
def record_routes(layers: list[MoELayer]) -> Iterator[list[dict]]:
    """Probe mode for every MoE layer: no token dropping, and the gate's routes plus every local expert linear's input
    X and output Y recorded. Yields one dict per layer:
    ``{"indices": [S], "locations": [S], "capacity": C, "linears": {local: [(X, Y, linear), ...]}}``."""
    handles, saved, routes = [], [], []
    for layer in layers:
        saved.append(layer.gate.drop_tokens)
        layer.gate.drop_tokens = False  # capacity = max load: no sample's tokens are dropped because of another's
        rec: dict = {"linears": {i: [] for i in range(layer.num_local_experts)}}
        routes.append(rec)

        def gate_hook(_module, _inputs, output, rec=rec):
            _l_aux, capacity, _E, indices, locations, _gates, _counts = output
            rec.update(indices=indices[0].long(), locations=locations[0].long(), capacity=int(capacity))

        handles.append(layer.gate.register_forward_hook(gate_hook))
        for i, expert in enumerate(layer.local_experts()):
            for lin in expert_linears(expert):
                def lin_hook(module, inputs, output, rec=rec, i=i):
                    rec["linears"][i].append((inputs[0].detach(), output, module))
                handles.append(lin.register_forward_hook(lin_hook))
    try:
        yield routes
    finally:
        for h in handles:
            h.remove()
        for layer, drop in zip(layers, saved):
            layer.gate.drop_tokens = drop


def slot_samples(routes: dict, expert: int, seq_len: int) -> torch.Tensor:
    """For global expert ``expert``: sample index of every slot of its capacity buffer (this rank's tokens), -1 if
    the slot is empty. Shape [C]."""
    C = routes["capacity"]
    out = torch.full((C,), -1, dtype=torch.long, device=routes["indices"].device)
    mine = (routes["indices"] == expert).nonzero().flatten()
    out[routes["locations"][mine]] = mine // seq_len
    return out


def linear_slot_kernel(x: torch.Tensor, dy: torch.Tensor, bias: bool = True) -> torch.Tensor:
    """K[c, c'] = <dW_c, dW_c'> + <db_c, db_c'> for the rank-one per-slot gradients of y = x Wᵀ + b:
    dW_c = dy_c ⊗ x_c, db_c = dy_c, so K = (dy dyᵀ) ⊙ (x xᵀ + 1) (without the +1 for a bias-free linear)."""
    return (dy @ dy.t()) * (x @ x.t() + (1.0 if bias else 0.0))


def expert_partial_grams(layers: list[MoELayer], routes: list[dict], grads, shape: tuple[int, int]) -> torch.Tensor:
    """This rank's share of Θ^e for every expert of every MoE layer, float32 [n_moe_layers · E, n, n] (zeros for
    experts another rank computes). ``grads``: d(Σf)/dY of every recorded expert linear, in ``record_routes`` order.

    Each slot of an expert's capacity buffer holds one token, and each token belongs to one sample, so the per-sample
    gradient of expert e is G_i = Σ_{slots c of sample i} g_c with g_c the slot's rank-one gradient. Hence
    Θ^e = S K Sᵀ with S the [n, C] slot->sample indicator and K the slot kernel summed over the expert's linears:
    exact, and no per-sample gradient is materialised.

    Work split: expert e of MoE layer j is computed by ONE rank among those holding it (its expert-data-parallel
    group member with index (j·E + e) mod group size); the caller's all-reduce over all ranks completes the tensor.
    """
    n, T = shape
    distributed = size_of() > 1
    E = layers[0].num_experts if layers else 0
    grams = torch.zeros(len(layers) * E, n, n, dtype=torch.float32)
    grads = iter(grads)
    for j, (layer, rec) in enumerate(zip(layers, routes)):
        if layer.num_experts != E:
            raise ConfigError("all MoE layers must have the same number of experts")
        for i, recs in rec["linears"].items():
            e = layer.global_index(i)
            kern = None
            for (x, y, lin) in recs:
                dy = next(grads)
                dy = torch.zeros_like(y) if dy is None else dy
                # [ep, C, d]: keep the slab this rank sent to itself (its own tokens, see the module docstring).
                xs = x.reshape(layer.ep_size, -1, x.shape[-1])[layer.ep_rank].float()
                dys = dy.reshape(layer.ep_size, -1, dy.shape[-1])[layer.ep_rank].float()
                k = linear_slot_kernel(xs, dys, lin.bias is not None)
                kern = k if kern is None else kern + k
            if kern is None:
                continue
            if distributed:
                edp = layer.data_parallel_group()
                if (j * E + e) % size_of(edp) != rank_in(edp):
                    continue  # another holder of this expert computes it
            slots = slot_samples(rec, e, T)
            S = torch.zeros(n, slots.numel(), dtype=torch.float32, device=kern.device)
            used = slots >= 0
            S[slots[used], used.nonzero().flatten()] = 1.0
            grams[j * E + e] = S @ kern @ S.t()
    return grams


class DeepSpeedMoESource(RecordingSource):
    """The experts of ``deepspeed.moe`` layers as a unit source (``sources.UnitSource``, kind "experts"): rows
    j·E + e (MoE layer j in module order, global expert e). Its recording also puts every MoE layer in probe mode."""

    def size(self) -> int:
        return sum(layer.num_experts for layer in self.layers)

    def _record(self):
        return record_routes(self.layers)

    def outputs(self) -> list[torch.Tensor]:
        return [y for rec in self._recorded for recs in rec["linears"].values() for (_, y, _) in recs]

    def partial_grams(self, grads, shape: tuple[int, int], work, device) -> torch.Tensor:
        return expert_partial_grams(self.layers, self._take(), grads, shape).to(device)
