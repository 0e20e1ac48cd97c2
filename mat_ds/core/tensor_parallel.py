"""MAT under DeepSpeed AutoTP training: the head-wise layers, sharded Megatron-style over the tensor-parallel group.

A user adds ``"tensor_parallel": {"autotp_size": tp}`` to the DeepSpeed JSON and nothing else. Inside
``deepspeed.initialize`` AutoTP replaces ``nn.Linear`` layers by its column-parallel ``LinearLayer`` and row-parallel
``LinearAllreduce`` (``module_inject/layers.py``), but mat_ds has already turned the attention projections into
``HeadwiseLinear`` (so the optimizer DeepSpeed builds in the same call sees one parameter per unit), which AutoTP does
not recognise: left alone they would stay whole on every rank (attention replicated, MLP sharded). So mat_ds shards
them itself, before ``deepspeed.initialize``, on the groups the engine will use (``topology.ensure_tp_groups``):

* unit u of a layer (a head, a KV group, an MLP group) lives on TP rank ``u // (U / tp)``: contiguous blocks, the
  split Megatron-Core and AutoTP make (rank r holds heads / KV groups ``[r·U/tp, (r+1)·U/tp)``). A rank's module
  keeps the full layer's parameter OBJECTS under their GLOBAL names (``w{u}``, ``b{u}``: the names of the unsharded
  layer), so a parameter list taken before sharding still names the right tensors; ``unit_offset`` /
  ``units_total`` say which units are local (``weight_params`` / ``unit_params(j)`` return the local ones);
* split ``"out"`` (Q/K/V, MLP up/gate) is column-parallel: the replicated input goes through ``_CopyToTP`` (identity
  forward, all-reduce of the input gradient over the TP group in backward: each rank's GEMM gives only its units'
  share of dL/dx); its per-unit biases are sharded with their units;
* split ``"in"`` (attention output, MLP down) is row-parallel: the local units' input columns produce a partial sum
  that ``_ReduceFromTP`` all-reduces in forward (identity backward: the upstream gradient is replicated). Its
  bias is shared by all units, so, as in DeepSpeed's ``LinearAllreduce``, it is replicated, added once AFTER the
  reduction, and not marked tensor-parallel.

Why shard ourselves (candidate (a)) rather than let DeepSpeed shard and convert afterwards (b): AutoTP's sharding is
``DeepSpeedEngine._apply_autotp_partitioning``, a step inside the engine constructor that runs right before the same
constructor builds the optimizer; there is no public hook between the two, and converting afterwards would hand
DeepSpeed's optimizer the un-split ``LinearLayer`` weights. Running AutoTP ourselves first (``module_inject.AutoTP``
plus ``ds_autotp_parsed``) would mean re-implementing the engine's tp_plan / preset / vocab-head / replicated-grad
logic. Sharding the head-wise layers is small, needs nothing from DeepSpeed but its TP group, and leaves AutoTP to
do everything else (MLP, LM head) exactly as it does without MAT.

What makes MAT exact under TP (tests/scripts/tp_check.py measures each):

* Grams are local: a unit's Q/K/V rows and output columns sit on one TP rank, the column-parallel input is
  replicated and the row-parallel output's upstream gradient is replicated, so the per-sample gradient of a unit's
  parameters is computed on its rank exactly as without TP (``mntk.probe_units`` with the ``Topology``: each rank
  fills its units' rows; one all-reduce over the world assembles the table everywhere);
* gradient clipping: DeepSpeed counts a parameter in the global norm on every TP rank iff
  ``runtime.utils.is_model_parallel_parameter(p)`` (``p.tensor_model_parallel``, the attribute AutoTP's
  ``config_tp_params`` sets), else on TP rank 0 only, then sums over the TP group. Unit parameters get that marking
  (each rank's shard counted once); the shared row-parallel bias does not (replicated: counted once, not tp times);
* freezing is per rank: a frozen unit's parameters exist on one TP rank only, and ``requires_grad_(False)`` there
  stops its dW and its data-parallel gradient reduction, exactly as without TP.

Elastic resume (another TP size, through DeepSpeed's universal checkpoint, ``mat_ds/universal.py``): every TP rank
registers ALL U units' names; the units another rank owns are kept EMPTIED (shape 0 along the split: DeepSpeed
leaves zero-element parameters out of the optimizer, and they take no part in forward or backward). Each unit
parameter carries AutoTP's universal-checkpoint metadata (``DS_AUTOTP_UC_META``, picked up by
``collect_autotp_universal_checkpoint_info`` inside ``deepspeed.initialize``) with an affine map: the whole tensor on
its owner, nothing on the others. ``ds_to_universal`` then writes ONE ``zero/...w{u}/`` per global unit with the
whole tensor (from its owner's fragments), and the universal loader at any TP size gives it to the rank that owns
it there; at TP 1 the unsharded layer's ``w{u}`` has exactly that name and shape. Without global names the same
local name (``w0``) would be a different unit on every rank and no conversion could tell them apart.

Supported: families whose attention reads head counts from the projection shapes, or is told its rank's counts by
its adapter (``FamilySpec.localize_heads``); an adapter's ``TENSOR_PARALLEL`` lists the unit kinds it offers under
TP: HF LLaMA / Mistral / Qwen2 heads and MLP units, HF BERT, GPT-NeoX and Phi-3 heads. ZeRO stages 0-2, no MoE
experts (``check_tensor_parallel``); an HF tp_plan DeepSpeed cannot apply is refused up front (``check_autotp_plan``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .config import ConfigError
from .headwise import HeadwiseLinear, HeadwiseLinearFn

UNIT_PARTITION_TYPE = "mat_ds_unit"  # DS_AUTOTP_UC_META partition_type of a head-wise unit parameter (whole on one rank)


class _CopyToTP(torch.autograd.Function):
    """Enter a column-parallel layer: identity forward; backward sums the input gradient over the TP group."""

    @staticmethod
    def forward(ctx, x, group):  # type: ignore[override]
        ctx.group = group
        return x.view_as(x)  # a new autograd node over the same data (no copy)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        from deepspeed import comm as ds_dist  # DeepSpeed's comm layer, like AutoTP's own layers (comms logger)

        grad = grad.contiguous()
        ds_dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    """Leave a row-parallel layer: forward sums the partial outputs over the TP group; identity backward."""

    @staticmethod
    def forward(ctx, y, group):  # type: ignore[override]
        from deepspeed import comm as ds_dist

        out = y.contiguous().clone()  # the partial output stays intact: the mNTK probe takes gradients w.r.t. it
        ds_dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad, None


class TPHeadwiseLinear(HeadwiseLinear):
    """This tensor-parallel rank's units of a head-wise linear (``shard``); see the module docstring.

    ``n_units`` / ``d_in`` / ``d_out`` / ``unit_layout()`` describe the LOCAL layer (what this rank computes);
    ``unit_offset`` is the global index of local unit 0 and ``units_total`` the layer's unit count over all TP ranks.
    """

    tp_group = None
    tp_size = 1
    tp_rank = 0

    @classmethod
    def shard(cls, full: HeadwiseLinear, tp_rank: int, tp_size: int, group) -> "TPHeadwiseLinear":
        """Rank ``tp_rank``'s part of ``full``: its units' parameter objects, nothing copied; every other unit's
        parameter object stays registered under its global name, emptied (see ``_GLOBAL_NAMES``)."""
        U = full.n_units
        if U % tp_size:
            raise ValueError(f"{U} units are not divisible over {tp_size} tensor-parallel ranks")
        n, off = U // tp_size, tp_rank * (U // tp_size)
        lay = full.unit_layout()[off:off + n]  # the local units' channels, as channel indices of the full layer
        # Local channels keep the full layer's order (GPT-2's blocked [Q|K|V] stays [Q_r|K_r|V_r]): renumber them.
        local_lay = torch.searchsorted(lay.flatten().sort().values, lay)
        width = lay.numel()
        d_in, d_out = (full.d_in, width) if full.split == "out" else (width, full.d_out)
        mod = cls(d_in, d_out, n, full.split, bias=full.has_unit_bias or full.bias is not None, layout=local_lay,
                  layer=full.layer, device="meta", dtype=full.weight_params()[0].dtype, kind=full.kind)
        mod._parameters.clear()  # the meta placeholders of the local layer: re-registered below, under global names
        base = full.unit_offset  # 0: ``full`` is an unsharded layer (shard_model never shards twice)
        prefixes = ("w", "b") if full.has_unit_bias else ("w",)
        for prefix in prefixes:
            for u in range(U):
                p = getattr(full, f"{prefix}{u}")
                owner = u // n
                _describe_unit_param(p, owner, tp_size, tp_rank, full.split, prefix == "b")
                if owner != tp_rank:
                    p.data = p.data.new_empty(_empty_shape(p, full.split, prefix == "b"))
                p.tensor_model_parallel = True  # DeepSpeed's global norm: count this shard on its own TP rank
                mod.register_parameter(f"{prefix}{base + u}", p)
        mod.bias = full.bias  # split "in": the shared, replicated bias (or None)
        mod.unit_offset, mod.units_total = base + off, full.units_total
        mod.tp_group, mod.tp_size, mod.tp_rank = group, tp_size, tp_rank
        mod.train(full.training)
        return mod

    # Global names: local unit j is ``w{unit_offset + j}`` (see the module docstring, "Elastic resume").
    def weight_params(self) -> list[nn.Parameter]:
        return [getattr(self, f"w{self.unit_offset + j}") for j in range(self.n_units)]

    def bias_params(self) -> list[nn.Parameter]:
        return ([getattr(self, f"b{self.unit_offset + j}") for j in range(self.n_units)]
                if self.has_unit_bias else [])

    def unit_params(self, u: int) -> list[nn.Parameter]:
        """Everything LOCAL unit ``u`` (global ``unit_offset + u``) owns in this layer."""
        out = [getattr(self, f"w{self.unit_offset + u}")]
        if self.has_unit_bias:
            out.append(getattr(self, f"b{self.unit_offset + u}"))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.split == "out":
            x = _CopyToTP.apply(x, self.tp_group)
        probing = self.recorder is not None
        y = HeadwiseLinearFn.apply(x, self._plan, self.split_dim, not probing, None, *self.weight_params(),
                                   *self.bias_params())
        if probing:
            self.recorder.append((self, x.detach(), y))  # "in": the partial output (its gradient is the full dY)
        if self.split == "in":
            y = _ReduceFromTP.apply(y, self.tp_group)
            if self.bias is not None:
                y = y + self.bias
        return y

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", units={self.unit_offset}..{self.unit_offset + self.n_units - 1} of "
                f"{self.units_total}, tp={self.tp_rank}/{self.tp_size}")


def _empty_shape(p: torch.Tensor, split: str, is_bias: bool) -> tuple:
    """What a TP rank that does not own unit parameter ``p`` holds under its name: no channels along the split."""
    shape = list(p.shape)
    shape[0 if (is_bias or split == "out") else 1] = 0
    return tuple(shape)


def _describe_unit_param(p: torch.Tensor, owner: int, tp_size: int, tp_rank: int, split: str, is_bias: bool) -> None:
    """Tell DeepSpeed's universal checkpoint how unit parameter ``p`` lies over the TP group: whole on TP rank
    ``owner``, nothing on the others (an AutoTP affine map, ``deepspeed/checkpoint/affine.py``). ``ds_to_universal``
    then rebuilds the whole unit from its owner's slice, and the universal loader at any TP size hands it to the
    rank that owns it there (at TP 1 the unsharded layer's ``w{u}`` has exactly that shape)."""
    from deepspeed.checkpoint.affine import AffinePiece, ParamAffineMap
    from deepspeed.checkpoint.constants import DS_AUTOTP_UC_META
    from deepspeed.module_inject.layers import _build_param_uc_restore_meta

    shape = tuple(p.shape)
    strides = tuple(int(s) for s in torch.empty(shape, device="meta").stride())
    empty = _empty_shape(p, split, is_bias)
    whole = AffinePiece(shape=shape, source_offset=0, source_strides=strides, dest_offset=0, dest_strides=strides,
                        locations=[owner])
    amap = ParamAffineMap(logical_shape=shape, shard_shapes={r: shape if r == owner else empty for r in range(tp_size)},
                          pieces_by_rank={r: [whole] if r == owner else [] for r in range(tp_size)})
    setattr(p, DS_AUTOTP_UC_META, _build_param_uc_restore_meta(
        partition_type=UNIT_PARTITION_TYPE, logical_shape=shape, original_shape=shape, target_partition_shape=(
            shape if owner == tp_rank else empty), is_bias=is_bias, affine_map=amap))


def check_tensor_parallel(model: nn.Module, tp_size: int, stage: int, has_experts: bool,
                          kinds: tuple, family: Optional[str]) -> None:
    """Everything MAT needs for ``tensor_parallel.autotp_size = tp_size``, said in one line before any group exists."""
    if stage == 3:
        raise ConfigError(f"tensor_parallel.autotp_size={tp_size} with ZeRO stage 3: MAT under tensor parallelism "
                          f"runs on ZeRO stages 0-2 (those DeepSpeed AutoTP training supports): use "
                          f"zero_optimization.stage 1 or 2")
    if has_experts:
        raise ConfigError(f"tensor_parallel.autotp_size={tp_size} with MoE experts is not supported by MAT: train "
                          f"MoE models without tensor parallelism")
    if "heads" not in kinds:
        fix = ("remove tensor_parallel or train without MAT" if family else
               "remove tensor_parallel, or, if your attention reads its head count from the projection shapes (or "
               "you give it its rank's counts), register your model with mat_ds.register_family(mat_ds.FamilySpec(..., "
               "tensor_parallel=(\"heads\",))) (README: 'Tensor parallelism')")
        raise ConfigError(f"MAT under tensor parallelism (tensor_parallel.autotp_size={tp_size}) supports HF "
                          f"LLaMA / Mistral / Qwen2, BERT, GPT-NeoX, Phi-3 and registered families whose spec says so, "
                          f"not {family or 'user-marked head-wise layers'} ({type(model).__name__}): {fix}")
    groups = _groups(model)
    if "mlp" not in kinds and any(kind == "mlp" for kind, _ in groups):
        raise ConfigError(f"MLP units under tensor parallelism are not supported for {family} (its adapter says why): "
                          f"remove 'mlp' from mat.modules, or tensor_parallel")
    for key, mods in groups.items():
        U = mods[0].units_total
        if U % tp_size:
            kind, layer = key
            what = ("attention units (one per KV head under grouped-query attention)" if kind == "heads"
                    else "MLP units (mat.mlp_groups)")
            raise ConfigError(f"tensor_parallel.autotp_size={tp_size} does not divide the {U} {what} of layer "
                              f"{layer}: each TP rank must hold whole units; use a tp size that divides {U}")


def check_autotp_plan(model: nn.Module, tp_block: dict) -> None:
    """Given neither ``preset_model`` nor ``partition_config``, DeepSpeed 0.19.8 shards an HF model by its
    ``base_model_tp_plan`` and rejects the WHOLE plan when one style is one it lacks (Phi-3's "rowwise_split_input"):
    a ValueError traceback from inside ``deepspeed.initialize``, MAT or not. Asked here, the same way, and said in one
    line with the fix (the model's DeepSpeed preset where one exists)."""
    if tp_block.get("preset_model") or tp_block.get("partition_config"):
        return
    from deepspeed.module_inject.autotp_config import AutoTPPresets
    from deepspeed.module_inject.tp_plan_converter import TPPlanConverter
    from deepspeed.runtime.tensor_parallel.config import _get_hf_tp_plan

    plan = _get_hf_tp_plan(model)
    if not plan:
        return
    try:
        TPPlanConverter.convert(plan)
    except ValueError as exc:
        model_type = str(getattr(getattr(model, "config", None), "model_type", "") or "")
        fix = (f'"preset_model": "{model_type}"' if model_type and AutoTPPresets.get_preset(model_type) is not None
               else 'a "partition_config"')
        reason = str(exc).split(". ")[0]
        raise ConfigError(f"DeepSpeed's AutoTP cannot shard {type(model).__name__} by its Hugging Face tp_plan "
                          f"({reason}): add {fix} to the \"tensor_parallel\" block") from None


def _groups(model: nn.Module) -> dict[tuple, list[HeadwiseLinear]]:
    out: dict[tuple, list[HeadwiseLinear]] = {}
    for m in model.modules():
        if isinstance(m, HeadwiseLinear):
            out.setdefault((m.kind, m.layer), []).append(m)
    return out


def shard_model(model: nn.Module, tp_rank: int, tp_size: int, group) -> set[int]:
    """Replace every head-wise linear of ``model`` by this rank's ``TPHeadwiseLinear`` (in place). Returns the ids of
    parameters to drop from optimizer parameter lists: none of the unit parameters (the other ranks' units stay in
    them, emptied, so that DeepSpeed records every unit name on every TP rank). Idempotent."""
    todo = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if isinstance(child, HeadwiseLinear) and not isinstance(child, TPHeadwiseLinear)]
    done: dict[int, TPHeadwiseLinear] = {}
    dropped: set[int] = set()
    for parent, name, child in todo:
        if id(child) not in done:  # a module reachable under two names is sharded once
            done[id(child)] = TPHeadwiseLinear.shard(child, tp_rank, tp_size, group)
            kept = {id(p) for p in done[id(child)].parameters()}
            dropped |= {id(p) for p in child.parameters() if id(p) not in kept}
        setattr(parent, name, done[id(child)])
    return dropped


def sharded_tp_size(model: nn.Module) -> int:
    """The TP size the model's head-wise layers are sharded for (1: not sharded)."""
    sizes = {int(m.tp_size) for m in model.modules() if isinstance(m, TPHeadwiseLinear)}
    if len(sizes) > 1:
        raise ConfigError(f"the model's head-wise layers are sharded for different TP sizes {sorted(sizes)}")
    return sizes.pop() if sizes else 1
