"""The probe: a fixed set of n samples and the scalar output f_i whose Jacobian defines the mNTK.

Probe set (``ProbeSet``). Either the user passes one batch (``mat_ds.initialize(..., probe_batch=batch)``, a dict of
tensors with n rows, the same on every rank), or — no extra plumbing — the engine keeps the first
``mat.probe_samples`` samples it is trained on: at the first training forward of each optimizer step until the set
is full, each data-parallel replica's micro-batch is gathered to all ranks (rank order) and appended. So λmax at
step 0 needs ``probe_samples <= dp_size × micro_batch`` (dp_size = world_size without tensor parallelism); otherwise
the first measurement is at the first refresh step after the set is full (and nothing is frozen before it).
Micro-batches of different lengths are right-padded (``labels`` with -100, everything else with 0, which HF reads as
"masked" for ``attention_mask``). The set travels in checkpoints, so a resumed run measures on the same samples.

Scalar output (``mat.probe_output``) in Hugging Face's conventions, from logits and ``labels`` (-100 = not a target):

* ``"loss"``: the sample's mean cross-entropy over its target tokens. ``masked_lm`` (BERT-style): position t predicts
  labels[t]; ``causal_lm`` (GPT/LLaMA-style): position t predicts labels[t+1] (HF shifts inside the loss; so do we);
* ``"logit_projection"``: mean over target positions of <r_t, logits_t>, r_t fixed random unit vectors (seeded), a
  one-sample sketch of the output-space NTK;
* ``"logit_sum"``: the sum of all logits at target positions (the related lab implementation's choice, see README).

Other objectives: pass ``probe_fn(model, batch) -> Tensor[n]``; samples must be independent (the model runs in eval
mode: no dropout; nothing may mix samples, e.g. no batch norm in train mode).
"""
from __future__ import annotations

import inspect
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .config import ConfigError
from .topology import size_of

OBJECTIVES = ("masked_lm", "causal_lm")


def _targets(labels: torch.Tensor, causal: bool) -> torch.Tensor:
    """Targets aligned with logit positions: shifted for causal LMs (position t predicts t+1)."""
    if not causal:
        return labels
    return torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)


def per_sample_output(logits: torch.Tensor, labels: torch.Tensor, causal: bool, probe_output: str,
                      seed: int = 0) -> torch.Tensor:
    """f_i for every sample from logits [n, T, V] and labels [n, T]; see the module docstring."""
    targets = _targets(labels, causal)
    valid = targets != -100
    count = valid.sum(1).clamp_min(1).to(torch.float32)
    if probe_output == "loss":
        tok = F.cross_entropy(logits.float().transpose(1, 2), targets.clamp_min(0), reduction="none")  # [n, T]
        return (tok * valid).sum(1) / count
    if probe_output == "logit_projection":
        gen = torch.Generator().manual_seed(seed)
        r = torch.randn(logits.shape[1], logits.shape[2], generator=gen)
        r = (r / r.norm(dim=-1, keepdim=True)).to(logits.device)
        proj = (logits.float() * r).sum(-1)
        return (proj * valid).sum(1) / count
    if probe_output == "logit_sum":
        return (logits.float().sum(-1) * valid).sum(1)
    raise ValueError(f"unknown probe_output {probe_output!r}")


def hf_probe_fn(objective: str, probe_output: str, seed: int = 0) -> Callable[[nn.Module, dict], torch.Tensor]:
    """f_i for a Hugging Face LM called as ``model(**batch)`` whose output has ``.logits``; labels from ``batch``."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")

    def probe_fn(model: nn.Module, batch: dict) -> torch.Tensor:
        if "labels" not in batch:
            raise ConfigError("the probe batch has no 'labels': HF masked/causal LM probes need them (-100 = ignore), "
                              "or pass probe_fn= to mat_ds.initialize")
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        out = model(**inputs)
        logits = out.logits if hasattr(out, "logits") else out[0]
        return per_sample_output(logits, batch["labels"], objective == "causal_lm", probe_output, seed)

    return probe_fn


# ----------------------------------------------------------------------------------------------------------------------
# The probe set
# ----------------------------------------------------------------------------------------------------------------------
def _pad_value(key: str) -> int:
    return -100 if key == "labels" else 0


def _concat(batches: list[dict], n: int) -> dict:
    """Concatenate dict-of-tensor batches along dim 0 (right-padding dim 1 where lengths differ), first n rows."""
    keys = list(batches[0])
    out = {}
    for k in keys:
        parts = [b[k] for b in batches]
        if parts[0].dim() >= 2:
            T = max(p.shape[1] for p in parts)
            parts = [F.pad(p, (0, 0) * (p.dim() - 2) + (0, T - p.shape[1]), value=_pad_value(k))
                     if p.shape[1] < T else p for p in parts]
        out[k] = torch.cat(parts)[:n]
    return out


class ProbeSet:
    """n fixed probe samples: given, or captured from the first training batches (see the module docstring)."""

    def __init__(self, n: int, batch: Optional[dict] = None, forward: Optional[Callable] = None, group=None):
        self.n = n
        # Whose micro-batches make up the set: the data-parallel group (None: the world). Under tensor parallelism
        # the TP ranks of a replica see the same samples, so gathering over the world would repeat each of them
        # tp times; over the DP group every rank ends with the same set (core/topology.py).
        self.group = group
        self._parts: list[dict] = []
        self._have = 0
        self.batch: Optional[dict] = None
        self._signature = inspect.signature(forward) if forward is not None else None
        if batch is not None:
            batch = {k: v for k, v in batch.items() if torch.is_tensor(v)}
            if "input_ids" not in batch:
                raise ConfigError("probe_batch needs an 'input_ids' tensor [n, T]")
            have = batch["input_ids"].shape[0]
            if have < n:
                raise ConfigError(f"probe_batch has {have} samples but mat.probe_samples={n}: pass at least that many "
                                  f"or lower mat.probe_samples")
            self.batch = {k: v[:n] for k, v in batch.items()}

    @property
    def ready(self) -> bool:
        return self.batch is not None

    def _as_batch(self, args: tuple, kwargs: dict) -> dict:
        """The call's tensor arguments by name (positional ones named through the model's forward signature)."""
        named = dict(kwargs)
        if args:
            if self._signature is None:
                raise ConfigError("cannot name positional forward arguments for the probe: call the engine with "
                                  "keyword arguments or pass probe_batch= to mat_ds.initialize")
            named = dict(self._signature.bind_partial(*args, **kwargs).arguments)
        if "input_ids" not in named:
            raise ConfigError("mat_ds captures the probe set from the training batches, which need an 'input_ids' "
                              "argument; pass probe_batch= (a dict with input_ids [n, T]) to mat_ds.initialize")
        rows = named["input_ids"].shape[0]
        return {k: v.detach().cpu() for k, v in named.items()
                if torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == rows}

    def observe(self, args: tuple, kwargs: dict) -> None:
        """Add this training forward's samples (all ranks, rank order) until n are collected. Collective: every rank
        must call it at the same forward (they all do: it runs in the engine's forward pre-hook)."""
        if self.ready:
            return
        mine = self._as_batch(args, kwargs)
        if size_of(self.group) > 1:
            gathered: list = [None] * size_of(self.group)
            dist.all_gather_object(gathered, mine, group=self.group)
        else:
            gathered = [mine]
        for part in gathered:
            if self._have >= self.n:
                break
            self._parts.append(part)
            self._have += part["input_ids"].shape[0]
        if self._have >= self.n:
            self.batch = _concat(self._parts, self.n)
            self._parts = []

    def on(self, device: torch.device) -> dict:
        assert self.batch is not None
        return {k: v.to(device) for k, v in self.batch.items()}

    def state_dict(self) -> dict:
        return {"batch": self.batch}

    def load_state_dict(self, state: dict) -> None:
        if state.get("batch") is not None:
            self.batch = {k: v.cpu() for k, v in state["batch"].items()}
            self._parts, self._have = [], self.n
