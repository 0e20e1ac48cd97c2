"""MoE experts of ANY module that implements the small "per-expert experts" protocol below, as MAT units (kind
``experts``, name ``L{layer}E{e}``). ``mat_ds/adapters/hf_moe.py`` converts Hugging Face fused experts (Mixtral,
Qwen2/3-MoE, OLMoE, ...) into such modules; ``deepspeed.moe`` layers keep their own path (``experts.py``).

Protocol (duck-typed; a module is an experts layer when it has a callable ``mat_expert_params``):

* ``mat_expert_params() -> list[list[nn.Parameter]]``: expert e's parameters (one list per expert, every one of them
  an own ``nn.Parameter``, so that a frozen expert leaves ZeRO's gradient reduction);
* ``layer``: the transformer layer index (int), for unit names and ordering;
* ``mat_recorder``: None, or (while probing) a list the module's forward appends one record per expert to:
  ``(e, tokens, [(x, y, has_bias), ...])`` where ``tokens`` [m] are the positions, in the flattened ``[n·T]`` token
  axis of the probe batch, of the m tokens routed to expert e (row r of x/y is token tokens[r]), and for each linear
  map y = x Wᵀ (+ b) of the expert: its input ``x`` [m, d_in] (detached) and its output ``y`` [m, d_out] (kept in the
  graph). With top-k routing a token appears in k experts' records, each with its own rows.

Gram (exact, no per-sample gradient materialised). The per-token weight gradient of a linear map is rank one,
g_t = dy_t ⊗ x_t (+ dy_t for a bias), with dy = d(Σ_i f_i)/dy. The router's gate weight and the activation function
sit between the expert's linear outputs and f, so they are inside dy. Token t belongs to sample t // T and samples
are independent in eval mode, so expert e's per-sample gradient is G_i = Σ_{t ∈ i} g_t and

    Θ^e_ij = <G_i, G_j> = Σ_{t ∈ i, s ∈ j} K_ts,    K = Σ_linears (dy dyᵀ) ⊙ (x xᵀ [+ 1]),    i.e. Θ^e = S K Sᵀ

with S the [n, m] token -> sample indicator. K is built in row blocks (memory ``BLOCK × m``). Work split: unit
number u (position among these layers' experts, in ``find_units`` order) is computed by rank u mod world; the caller's
ONE all-reduce of all Grams (heads, deepspeed.moe experts, these) completes it.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import nn

from .sources import RecordingSource
from .topology import rank_in, size_of

BLOCK = 4096  # token rows of the kernel built at once


def is_experts_layer(module: nn.Module) -> bool:
    return callable(getattr(module, "mat_expert_params", None))


def find_fused_expert_layers(model: nn.Module) -> list[nn.Module]:
    """Every protocol experts module in module order (the order of their units in ``ModelUnits.experts``)."""
    return [m for m in model.modules() if is_experts_layer(m)]


@contextlib.contextmanager
def record_fused(layers: list[nn.Module]) -> Iterator[list[list]]:
    """Probe mode: each layer appends its per-expert records to its own list (yielded, one list per layer)."""
    records: list[list] = [[] for _ in layers]
    for m, rec in zip(layers, records):
        m.mat_recorder = rec
    try:
        yield records
    finally:
        for m in layers:
            m.mat_recorder = None


def _linears(records: list[list]) -> Iterator[tuple]:
    for layer_records in records:
        for (_e, _tokens, linears) in layer_records:
            yield from linears


def fused_outputs(records: list[list]) -> list[torch.Tensor]:
    """The recorded expert-linear outputs the probe differentiates (those in the graph), in record order."""
    return [y for (_x, y, _b) in _linears(records) if y.requires_grad]


def token_kernel_gram(samples: torch.Tensor, linears: list[tuple], n: int, block: int = BLOCK) -> torch.Tensor:
    """Θ = S K Sᵀ [n, n] (float32) for one expert: ``samples`` [m] the sample of each routed token, ``linears`` a list
    of (x [m, d_in], dy [m, d_out], has_bias)."""
    m = samples.numel()
    device = samples.device
    gram = torch.zeros(n, n, dtype=torch.float32, device=device)
    if m == 0 or not linears:
        return gram
    S = torch.zeros(n, m, dtype=torch.float32, device=device)
    S[samples, torch.arange(m, device=device)] = 1.0
    for lo in range(0, m, block):
        hi = min(lo + block, m)
        k = None
        for x, dy, has_bias in linears:
            part = (dy[lo:hi] @ dy.t()) * (x[lo:hi] @ x.t() + (1.0 if has_bias else 0.0))
            k = part if k is None else k + part
        gram += S[:, lo:hi] @ k @ S.t()
    return gram


def fused_partial_grams(layers: list[nn.Module], records: list[list], grads, shape: tuple[int, int],
                        device=None) -> torch.Tensor:
    """This rank's share of Θ^e for every expert of ``layers``, float32 [Σ experts, n, n] in ``find_units`` order
    (zeros for the experts other ranks compute). ``grads``: d(Σf)/dy for ``fused_outputs(records)``, in order."""
    n, T = shape
    rank, world = rank_in(), size_of()  # experts are split over the whole world (the probe reduces over it)
    counts = [len(m.mat_expert_params()) for m in layers]
    grams = torch.zeros(sum(counts), n, n, dtype=torch.float32, device=device)
    grads = iter(grads)
    offset = 0
    for layer_records, E in zip(records, counts):
        # Merge the records of one expert (a layer called twice in one forward: one per-sample gradient per expert).
        merged: dict[int, tuple[list, list]] = {}
        for (e, tokens, linears) in layer_records:
            toks, pairs = merged.setdefault(int(e), ([], []))
            toks.append(tokens)
            for j, (x, y, has_bias) in enumerate(linears):
                dy: Optional[torch.Tensor] = next(grads) if y.requires_grad else None
                dy = torch.zeros_like(y) if dy is None else dy  # does not reach f: contributes 0
                if j == len(pairs):
                    pairs.append(([], [], bool(has_bias)))
                pairs[j][0].append(x.float())
                pairs[j][1].append(dy.float())
        for e, (toks, pairs) in merged.items():
            u = offset + e
            if (u % world) != rank or not pairs:
                continue
            tokens = torch.cat(toks)
            lin = [(torch.cat(xs), torch.cat(dys), b) for xs, dys, b in pairs]
            samples = torch.div(tokens.to(lin[0][0].device), T, rounding_mode="floor")
            if samples.numel() and int(samples.max()) >= n:
                raise ValueError(f"an experts layer saw token index {int(tokens.max())} but the probe batch has only "
                                 f"{n}x{T} tokens: the model must feed its experts the flattened [n*T] token axis")
            grams[u] += token_kernel_gram(samples, lin, n).to(grams.device)
        offset += E
    return grams


class FusedExpertSource(RecordingSource):
    """Per-expert modules of the protocol above as a unit source (``sources.UnitSource``, kind "experts"), after
    the deepspeed.moe experts in unit order."""

    def size(self) -> int:
        return sum(len(m.mat_expert_params()) for m in self.layers)

    def _record(self):
        return record_fused(self.layers)

    def outputs(self) -> list[torch.Tensor]:
        return fused_outputs(self._recorded)

    def partial_grams(self, grads, shape: tuple[int, int], work, device) -> torch.Tensor:
        return fused_partial_grams(self.layers, self._take(), grads, shape, device)
