"""Freezing and unfreezing groups of parameters ("modules", e.g. one attention head) of a live DeepSpeed engine.

MAT decides every ``refresh_interval`` steps which heads train. Freezing must (a) stop the frozen heads' weight-gradient
work and gradient communication, and (b) keep their weights and optimizer state exactly as they were, so that a head that
is re-activated later continues from where it stopped. DeepSpeed 0.19.8 gives (a) but not (b); this module adds (b).

What DeepSpeed does with a parameter whose ``requires_grad`` is switched off AFTER ``deepspeed.initialize``
(read in the source and measured on 2 gloo ranks, ZeRO stages 0-3):

* Autograd computes no gradient for it and ZeRO's per-parameter reduce hooks do not fire, so it leaves the gradient
  reduction (stage 0 ``_get_gradients_for_reduction`` skips ``requires_grad=False``; stage 1/2 buckets only what their
  hooks see; stage 3 puts ``torch.zeros_like(ds_tensor)`` into ``averaged_gradients`` instead of its grad buffer).
* A parameter that is frozen AT ``initialize`` is never handed to the optimizer and can never train again, so the engine
  must be built with everything trainable and frozen afterwards (``mat_ds/wrapper.py``).
* BUT ZeRO 1/2/3 step the optimizer on FLAT fp32 partitions: the frozen parameter's slice of the flat gradient is
  zero-filled, not absent, so AdamW still applies weight decay and the Adam momentum of earlier steps to it (the weight
  drifts by ~lr per step). The flat fp32 partition is then copied back into the model weights (stage 1/2:
  ``bit16_partitions[...].copy_(fp32_partition)`` + all-gather; stage 3: ``_reassign_or_swap_out_partitioned_parameters``).

The guard: step pre/post hooks on the INNER torch optimizer (``engine.basic_optimizer``, the one the ZeRO wrapper calls).
The pre-hook copies each frozen parameter's fragment of the flat fp32 partition and of every element-wise optimizer
state (``exp_avg``, ``exp_avg_sq``, ...); the post-hook writes them back. Because the restore happens before DeepSpeed
copies fp32 -> model weights, frozen weights stay bit-identical. Details that shape the hooks:

* ZeRO wrappers call ``optimizer.step()`` once per group (stage 1/2 narrow ``param_groups`` to that group; stage 3
  puts one sub-group's flat tensor into its group's ``params``), so the hooks guard whichever flat tensors are in
  ``param_groups`` at that call.
* Optimizer state is created lazily at the first step; a frozen region that had no state before a step gets 0 after it.
* Locations: stage 1/2 ``p._hp_mapping.get_hp_fragment_address()`` = (start, numel) in
  ``single_partition_of_fp32_groups[i]`` (``p`` in ``bit16_groups[i]``; no mapping on a rank holding no part of ``p``);
  bf16 with ZeRO-1 runs DeepSpeed's ``BF16_Optimizer``, the same scheme under other names (``bf16_groups``,
  ``fp32_groups_flat_partition``);
  stage 3 ``grad_position[get_param_id(p)] = [sub_group, offset, numel]`` in ``fp32_partitioned_groups_flat[sub_group]``
  (every rank holds a, possibly padded, shard of every parameter); stage 0: the optimizer holds the parameters themselves,
  the whole parameter is the region (torch AdamW already skips a parameter whose ``grad`` is None; the guard makes that
  exact regardless); stage 0 under bf16/fp16 wraps the torch optimizer in DeepSpeed's ``FP16_UnfusedOptimizer`` (one fp32
  copy per parameter, ``fp32_groups[i][j]`` for ``fp16_groups[i][j]``: the region is that whole copy) or, with a fused
  Adam, ``FP16_Optimizer`` (``fp32_groups_flat[i]`` = the concatenation of ``fp16_groups[i]``: the region is the
  parameter's offset in it). Both hand a frozen parameter a zero gradient (not None), step the fp32 copy, then copy
  fp32 -> model weights after the inner step, i.e. after the guard restored it.
  Flat tensors and state are looked up at every step, since checkpoint loading replaces state tensors.
* Gradient clipping is unaffected: a frozen parameter contributes a zero (or no) gradient to the global norm.

Re-activation: ``requires_grad_(True)`` re-enables DeepSpeed's reduce hooks (they were registered at ``initialize``) and
the guard lets go. The parameter continues with the Adam moments it had when it was frozen; the optimizer's step
counter is per flat tensor and kept advancing meanwhile, so its bias correction is that of the current step.
Without ZeRO, torch AdamW keeps one step count PER PARAMETER and a skipped (frozen) parameter stops counting; the guard
advances it with the others (creating zero moments if it had no state yet, as ZeRO's flat state would), so a
re-activated head gets the same bias correction, and the run the same trajectory, under ZeRO 0/1/2/3.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Optional

import torch

__all__ = ["FreezeController", "comm_bytes_snapshot", "GRADIENT_OPS", "MOE_DISPATCH_OP"]

# Op names under which DeepSpeed 0.19.8 reduces gradients (stage 0/1/2 on gloo: all_reduce; stage 2 may use reduce on
# GPUs; stage 3: reduce_scatter_tensor). ``all_reduce`` also carries a few scalars per step (grad norm, overflow flag:
# 4-32 bytes); ``all_gather_into_tensor`` is ZeRO's parameter traffic, not gradients. ``all_to_all_single`` is NOT
# counted: with MoE expert parallelism it is the token dispatch/combine (activations, forward and backward), logged
# apart as ``MOE_DISPATCH_OP`` traffic. (DeepSpeed's quantized-gradient path, ``zero_quantized_gradients``, would
# reduce gradients with it too; no mat_ds config enables it.)
GRADIENT_OPS = frozenset({"all_reduce", "reduce", "reduce_scatter_tensor", "reduce_scatter_fn"})
MOE_DISPATCH_OP = "all_to_all_single"


def comm_bytes_snapshot() -> dict[str, int]:
    """Cumulative bytes per communication op name recorded by DeepSpeed's comms logger ({} if it is disabled).

    Needs ``"comms_logger": {"enabled": true, "prof_all": true}`` in the DeepSpeed config. The logger counts every
    ``deepspeed.comm`` op (gradient reductions, ZeRO parameter all-gathers, ...) by its message size in bytes on the
    calling rank (not ``torch.distributed`` calls made directly); take the difference of two snapshots for a step's
    traffic, and sum the ops in ``GRADIENT_OPS`` for gradient traffic only. Measured drop of gradient bytes per optimizer
    step when parameters are frozen (fp32, A = gradient_accumulation_steps, W = world size):

    * stage 0 and 1: 4 * frozen_numel (gradients are all-reduced once, at the accumulation boundary);
    * stage 2: A * 4 * frozen_numel (buckets are reduced after every micro-batch's backward);
    * stage 3: A * 4 * sum(ceil(numel / W) * W) (reduce-scatter of per-parameter padded partitions, every micro-batch).
    """
    from deepspeed.comm import comm as ds_comm

    logger = getattr(ds_comm, "comms_logger", None)
    if logger is None or not logger.enabled:
        return {}
    return {op: sum(int(size) * int(rec[0]) for size, rec in sizes.items())
            for op, sizes in logger.comms_dict.items()}


class FreezeController:
    """Freezes/unfreezes groups of parameters ("modules", e.g. one attention head = its QKV and O params) of a
    DeepSpeed engine at run time, ZeRO stage 0/1/2/3.

    ``guard=False`` only toggles ``requires_grad`` (used by the tests to show that the guard is needed)."""

    def __init__(self, engine, modules: list[list[torch.nn.Parameter]], guard: bool = True):
        self.engine = engine
        self.modules = [list(m) for m in modules]
        self.frozen = torch.zeros(len(self.modules), dtype=torch.bool)
        self.guard = guard
        self.stage = int(engine.zero_optimization_stage())
        self.zero = engine.optimizer  # the DeepSpeed wrapper (ZeRO) or, without ZeRO, the torch optimizer itself
        self.inner = engine.basic_optimizer  # the torch optimizer that does the arithmetic
        self._frozen_params: list[torch.nn.Parameter] = []
        self._param_by_id = {id(p): p for params in self.modules for p in params}
        # key -> [(start, numel)] of frozen regions; a key names one flat tensor, resolved at every step.
        self._regions: dict[tuple, list[tuple[int, int]]] = {}
        self._saved: list = []
        self._hooks = []
        # A wrapper the guard cannot see into (ZeRO-Offload, bf16/fp16 without ZeRO) is refused when something is
        # to be FROZEN, not at construction: policy "full" (never freezes) must run there.
        self._unsupported = self._unsupported_reason()
        if self.stage in (1, 2):
            self._group_of = {id(p): i for i, g in enumerate(self._bit16_groups()) for p in g}
        self._half_wrapper = self.stage == 0 and self.zero is not self.inner and self._unsupported is None
        if self._half_wrapper:  # param -> (group, index in group, offset in the group's flat fp32 copy)
            self._fp32_of = {}
            for i, group in enumerate(self.zero.fp16_groups):
                offset = 0
                for j, p in enumerate(group):
                    self._fp32_of[id(p)] = (i, j, offset)
                    offset += p.numel()
        if guard:
            self._hooks = [self.inner.register_step_pre_hook(self._pre_step),
                           self.inner.register_step_post_hook(self._post_step)]

    # -- public API -------------------------------------------------------------------------------------------------
    def apply(self, frozen: torch.Tensor) -> None:
        """Set the frozen set (same on every rank — the caller broadcasts). Frozen: ``requires_grad_(False)``,
        ``p.grad = None``, its fragments registered with the guard. Unfrozen again: ``requires_grad_(True)``, guard
        released; it then trains normally with the Adam moments it had when it was frozen.

        Call between optimizer steps (not in the middle of gradient accumulation)."""
        frozen = torch.as_tensor(frozen).to(device="cpu", dtype=torch.bool).flatten()
        if frozen.numel() != len(self.modules):
            raise ValueError(f"frozen has {frozen.numel()} entries, expected one per module ({len(self.modules)})")
        if self._unsupported is not None and bool(frozen.any()):
            raise NotImplementedError(self._unsupported)
        frozen_ids = {id(p) for m, params in zip(frozen.tolist(), self.modules) if m for p in params}
        seen: set[int] = set()
        self._frozen_params = []
        for params in self.modules:
            for p in params:
                if id(p) in seen:
                    continue
                seen.add(id(p))
                if id(p) in frozen_ids:
                    p.requires_grad_(False)
                    p.grad = None  # no stale gradient may reach the optimizer (stage 0) or a reduction
                    self._frozen_params.append(p)
                else:
                    p.requires_grad_(True)
        self._regions = self._locate_all(self._frozen_params)
        self.frozen = frozen.clone()

    def frozen_numel(self) -> int:
        """Number of parameters currently frozen (full sizes, not this rank's shards)."""
        return sum(int(getattr(p, "ds_numel", p.numel())) for p in self._frozen_params)

    def close(self) -> None:
        """Remove the optimizer hooks (frozen parameters keep ``requires_grad=False``)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # -- where a parameter lives in the optimizer -------------------------------------------------------------------
    def _bit16_groups(self) -> list:
        groups = getattr(self.zero, "bit16_groups", None)
        return groups if groups is not None else self.zero.bf16_groups  # BF16_Optimizer (bf16 + ZeRO-1)

    def _unsupported_reason(self) -> Optional[str]:
        """Why this engine's optimizer cannot be guarded (None: it can)."""
        z = self.zero
        if self.stage == 3:
            if getattr(z, "offload_optimizer", False) or getattr(z, "offload_param", False):
                return "FreezeController does not support ZeRO-3 offload"
        elif self.stage in (1, 2):
            if getattr(z, "cpu_offload", False):
                return "FreezeController does not support ZeRO-Offload"
        elif z is not self.inner and type(z).__name__ not in ("FP16_UnfusedOptimizer", "FP16_Optimizer"):
            return (f"without ZeRO the guard knows torch optimizers and DeepSpeed's FP16_UnfusedOptimizer / "
                    f"FP16_Optimizer, got {type(z).__name__}")
        return None

    def _locate(self, p: torch.nn.Parameter) -> list[tuple[tuple, int, int]]:
        """[(flat key, start, numel)] of ``p``'s part of the fp32 master weights on this rank (may be empty)."""
        if self.stage == 3:
            sub_group, offset, numel = self.zero.grad_position[self.zero.get_param_id(p)]
            return [(("zero3", int(sub_group)), int(offset), int(numel))]
        if self.stage in (1, 2):
            mapping = getattr(p, "_hp_mapping", None)
            if not mapping:  # this rank's partition holds no part of p
                return []
            address = mapping.get_hp_fragment_address()
            return [(("zero12", self._group_of[id(p)]), int(address.start), int(address.numel))]
        if self._half_wrapper:
            i, j, offset = self._fp32_of[id(p)]
            if hasattr(self.zero, "fp32_groups_flat"):  # FP16_Optimizer (fused Adam): one flat copy per group
                return [(("fp32flat", i), offset, p.numel())]
            return [(("fp32copy", (i, j)), 0, p.numel())]  # FP16_UnfusedOptimizer: one fp32 copy per parameter
        return [(("param", id(p)), 0, p.numel())]

    def _locate_all(self, params: list[torch.nn.Parameter]) -> dict[tuple, list[tuple[int, int]]]:
        regions: dict[tuple, list[tuple[int, int]]] = defaultdict(list)
        for p in params:
            for key, start, numel in self._locate(p):
                if numel > 0:
                    regions[key].append((start, numel))
        return dict(regions)

    def _flat(self, key: tuple) -> torch.Tensor:
        kind, index = key
        if kind == "zero3":
            return self.zero.fp32_partitioned_groups_flat[index]
        if kind == "zero12":
            flats = getattr(self.zero, "single_partition_of_fp32_groups", None)
            return (flats if flats is not None else self.zero.fp32_groups_flat_partition)[index]
        if kind == "fp32flat":
            return self.zero.fp32_groups_flat[index]
        if kind == "fp32copy":
            return self.zero.fp32_groups[index[0]][index[1]]
        return self._param_by_id[index]

    # -- the guard --------------------------------------------------------------------------------------------------
    def _stepped_regions(self, optimizer) -> list[tuple[torch.Tensor, list[tuple[int, int]]]]:
        """(flat tensor, regions) for the frozen regions in the tensors this ``step()`` call will update."""
        if not self._regions:
            return []
        in_step = {id(t) for g in optimizer.param_groups for t in g["params"]}
        out = []
        for key, regions in self._regions.items():
            flat = self._flat(key)
            if id(flat) in in_step:
                out.append((flat, regions))
        return out

    @staticmethod
    def _state_tensors(optimizer, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Element-wise state of ``flat`` (exp_avg, exp_avg_sq, ...); scalars such as ``step`` are shared."""
        state = optimizer.state.get(flat, {})
        return {k: v for k, v in state.items() if torch.is_tensor(v) and v.shape == flat.shape}

    @torch.no_grad()
    def _pre_step(self, optimizer, args, kwargs) -> None:
        saved = []
        for flat, regions in self._stepped_regions(optimizer):
            data = flat.detach().view(-1)
            state = {k: v.view(-1) for k, v in self._state_tensors(optimizer, flat).items()}
            for start, numel in regions:
                saved.append((flat, start, numel, data[start:start + numel].clone(),
                               {k: v[start:start + numel].clone() for k, v in state.items()}))
        self._saved = saved

    @torch.no_grad()
    def _post_step(self, optimizer, args, kwargs) -> None:
        if self.stage == 0 and not self._half_wrapper:  # the wrappers give frozen params zero grads: all step
            self._advance_step_counts(optimizer)
        for flat, start, numel, weights, state_before in self._saved:
            flat.detach().view(-1)[start:start + numel].copy_(weights)
            for k, v in self._state_tensors(optimizer, flat).items():
                region = v.view(-1)[start:start + numel]
                if k in state_before:
                    region.copy_(state_before[k])
                else:  # state created by this very step: a frozen region had none, i.e. zero moments
                    region.zero_()
        self._saved = []

    def _advance_step_counts(self, optimizer) -> None:
        """Stage 0: keep frozen params' Adam ``step`` equal to the stepped params' (see module docstring)."""
        steps = [optimizer.state[t]["step"] for g in optimizer.param_groups for t in g["params"]
                 if t.grad is not None and "step" in optimizer.state.get(t, {})]
        if not steps:
            return
        for p in self._frozen_params:
            state = optimizer.state[p]
            if "step" not in state:
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] = steps[0].clone() if torch.is_tensor(steps[0]) else steps[0]
