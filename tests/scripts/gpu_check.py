"""The GPU-relevant checks of mat_ds in one launch (``scripts/gpu_check.sh`` runs it; docs/gpu_check.md):

    deepspeed --num_gpus $(nvidia-smi -L | wc -l) tests/scripts/gpu_check.py --out runs/gpu_check/results.jsonl

1. **backend**: the process group's backend (``nccl`` on GPUs), an all-reduce on ``comm_device()``, mat_ds's own
   collectives (``broadcast_masks``, ``all_gather_object`` of the probe capture) with the values checked;
2. **freeze** per case ``family:stage:precision`` (default: the own Transformer's heads on ZeRO-2/3 in fp32/bf16/fp16,
   Switch experts + heads on ZeRO-2 in fp32/bf16/fp16 with expert parallelism over 2 GPUs when there are 2+, HF BERT
   on ZeRO-2/3 in bf16): step 0 runs MAT's real refresh (probe on the accelerator, Gram all-reduce over NCCL), then a
   fixed set of heads (and experts) is frozen with ``engine.mat.freezer.apply`` for ``--freeze_steps`` steps. Frozen:
   weights (this rank's tensors, ``ds_tensor`` under ZeRO-3), this rank's fp32 master and Adam-moment fragments (read
   straight from DeepSpeed's ZeRO optimizer) and ``engine.mat.frozen_change`` must change by exactly 0; every other unit must move; losses finite;
3. **refresh** at a realistic size (``--bench_size base``: 12 layers, d=768, 12 heads, T=128, n=16 probe samples,
   vocabulary 30522, ZeRO-2 bf16): one refresh's wall time (median of ``--bench_repeats``) and peak accelerator memory
   above the engine's resident memory (``torch.cuda.max_memory_allocated``) for ``mat.probe_gram`` = materialized,
   ghost and auto; λmax of ghost/auto must match materialized (relative ``--lambda_rtol``).

Rank 0 prints one ``GPU_CHECK {json}`` line per check, then a table; ``--out`` also gets the rows as JSON lines. Exit
status: 0 all passed, 1 a check failed, 2 no CUDA device (unless ``--allow_cpu``: a dry run of the same code on gloo
ranks, used by the CPU tests). fp16 cases run where DeepSpeed's accelerator reports fp16
(``get_accelerator().is_fp16_supported()``, the query ``mat_ds.initialize`` makes: CUDA, and CPUs whose oneDNN has fp16,
e.g. AVX512-FP16/AMX Xeons) and are skipped, saying so, where it does not; every row carries every rank's answer
(``fp16_supported``).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
import traceback

import torch
import torch.distributed as dist

from tests.scripts.family_check import opt_fragments  # fp32 master / Adam fragments per ZeRO stage

PRECISIONS = ("fp32", "bf16", "fp16")
DEFAULT_CASES = ("own:2:fp32,own:2:bf16,own:2:fp16,own:3:fp32,own:3:bf16,own:3:fp16,"
                 "switch:2:fp32,switch:2:bf16,switch:2:fp16,bert:2:bf16,bert:3:bf16")
V, T, D, L, H, E = 128, 32, 64, 2, 4, 4
MICRO, N_PROBE = 4, 8
BENCH = {"base": dict(V=30522, T=128, D=768, L=12, H=12, n=16), "tiny": dict(V=256, T=32, D=64, L=2, H=4, n=8)}


# ----------------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------------
def device() -> torch.device:
    from deepspeed.accelerator import get_accelerator
    return torch.device(get_accelerator().current_device_name())


def on_gpu() -> bool:
    return device().type == "cuda"


def fp16_supported() -> bool:
    """This rank's DeepSpeed answer, the query ``mat_ds.initialize`` makes (its CPU accelerator says None for no)."""
    from deepspeed.accelerator import get_accelerator
    return bool(get_accelerator().is_fp16_supported())


def gather(obj) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_max(values: list[float]) -> list[float]:
    from mat_ds.core.engine import comm_device
    t = torch.tensor(values, dtype=torch.float64, device=comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.cpu().tolist()


def local(p: torch.nn.Parameter) -> torch.Tensor:
    return p.ds_tensor if hasattr(p, "ds_tensor") else p.data


def batch(seed: int, n: int, vocab: int, seq: int, causal: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, seq), generator=g)
    if causal:
        return {"input_ids": ids, "labels": ids.clone()}
    target = torch.rand(n, seq, generator=g) < 0.25
    target[:, 1] = True
    return {"input_ids": ids, "labels": torch.where(target, ids, torch.full_like(ids, -100))}


def precision_block(precision: str) -> dict:
    if precision == "bf16":
        return {"bf16": {"enabled": True}}
    if precision == "fp16":  # a small initial scale: the first steps of a tiny model must not all be skipped
        return {"fp16": {"enabled": True, "initial_scale_power": 8, "loss_scale_window": 100}}
    return {}


def ds_config(stage: int, precision: str, mat: dict, micro: int = MICRO) -> dict:
    zero: dict = {"stage": stage}
    if stage == 3:  # partition every (tiny) parameter for real
        zero.update({"stage3_param_persistence_threshold": 0})
    return {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
            "steps_per_print": 10**9,
            "optimizer": {"type": "AdamW", "params": {"lr": 5e-3, "weight_decay": 0.01, "torch_adam": True}},
            "zero_optimization": zero, **precision_block(precision), "mat": mat}


def build(family: str, ep: int):
    """(model, model_parameters, loss function(engine, batch))."""
    from mat_ds.config import ModelConfig
    from mat_ds.models.transformer import Transformer

    torch.manual_seed(0)  # identical initial weights on every rank
    if family in ("own", "switch"):
        moe = dict(moe_num_experts=E, moe_ep_size=ep, moe_layer_interval=1) if family == "switch" else {}
        model = Transformer(ModelConfig(arch="bert", n_layer=L, n_head=H, d_model=D, dropout=0.0, **moe), V, T)
        return model, model.param_groups(0.01), lambda eng, b: eng(b["input_ids"], b["labels"])
    if family == "bert":
        import transformers
        model = transformers.BertForMaskedLM(transformers.BertConfig(
            vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=H, intermediate_size=4 * D,
            max_position_embeddings=T, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
        return model, model.parameters(), lambda eng, b: eng(**b).loss
    raise ValueError(f"unknown family {family!r} (own, switch, bert)")


def release(engine) -> None:
    """Drop an engine's memory before the next case."""
    if engine is not None and hasattr(engine, "destroy"):
        try:
            engine.destroy()
        except Exception:  # noqa: BLE001 - best effort
            pass
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------------------
# 1. backend
# ----------------------------------------------------------------------------------------------------------------------
def check_backend() -> dict:
    from mat_ds.core.engine import broadcast_masks, comm_device

    rank, world = dist.get_rank(), dist.get_world_size()
    backend = dist.get_backend()
    t = torch.tensor([float(rank + 1)], device=comm_device())
    dist.all_reduce(t)
    sum_ok = float(t) == world * (world + 1) / 2
    masks = {"heads": torch.tensor([rank == 0, True, False]), "experts": torch.tensor([False, rank == 0])}
    got = broadcast_masks(masks, world)  # rank 0's masks everywhere
    bcast_ok = got["heads"].tolist() == [True, True, False] and got["experts"].tolist() == [False, True]
    objs = gather({"rank": rank, "ids": torch.arange(3) + rank})  # what ProbeSet.observe does with the probe batch
    gather_ok = [o["rank"] for o in objs] == list(range(world)) and all(
        o["ids"].tolist() == [r, r + 1, r + 2] for r, o in enumerate(objs))
    expected = "nccl" if on_gpu() else "gloo"
    ok = backend == expected and sum_ok and bcast_ok and gather_ok
    return {"check": "backend", "case": f"{backend} x{world}", "ok": ok, "backend": backend, "world": world,
            "comm_device": str(comm_device()), "all_reduce_ok": sum_ok, "broadcast_masks_ok": bcast_ok,
            "all_gather_object_ok": gather_ok,
            "detail": f"{backend} over {world} rank(s); all_reduce/broadcast_masks/all_gather_object "
                      f"{'ok' if sum_ok and bcast_ok and gather_ok else 'WRONG'}"}


# ----------------------------------------------------------------------------------------------------------------------
# 2. frozen means frozen, per family / ZeRO stage / precision
# ----------------------------------------------------------------------------------------------------------------------
def check_freeze(family: str, stage: int, precision: str, steps: int) -> dict:
    import mat_ds

    rank, world = dist.get_rank(), dist.get_world_size()
    ep = 2 if family == "switch" and world % 2 == 0 else 1
    dev = device()
    model, params, loss_of = build(family, ep)
    modules = ["heads", "experts"] if family == "switch" else ["heads"]
    mat = {"policy": "mat", "warmup_steps": 0, "refresh_interval": 10**6, "probe_samples": N_PROBE,
           "modules": modules}
    causal = False
    probe = batch(7, N_PROBE, V, T, causal)
    engine = None
    try:
        engine, *_ = mat_ds.initialize(model=model, model_parameters=params, config=ds_config(stage, precision, mat),
                                       probe_batch=probe)
        ctl, units = engine.mat, engine.mat.units
        micro = {k: v.to(dev) for k, v in batch(1000 + rank, MICRO, V, T, causal).items()}
        losses = []

        def step() -> None:
            loss = loss_of(engine, micro)
            engine.backward(loss)
            engine.step()
            losses.append(float(loss.detach().float()))

        step()  # step 0: MAT's own refresh (probe on the accelerator, Gram all-reduce)
        refreshed = ctl.last_probe is not None
        lam = ctl.last_probe.head_lambda_max() if refreshed else torch.tensor([float("nan")])
        lam_ok = refreshed and bool(torch.isfinite(lam).all()) and float(lam.max()) > 0
        elam = None
        if "experts" in modules:  # the experts' Grams (all-to-all routing recovery, slot kernels) on the accelerator
            grams = ctl.last_probe.expert_grams if refreshed else None
            elam = None if grams is None else ctl.last_probe.expert_lambda_max()
            lam_ok = lam_ok and elam is not None and bool(torch.isfinite(elam).all()) and float(elam.max()) > 0
        nh, ne = len(units.heads), len(units.experts)
        hpl = units.heads_per_layer
        heads = [1, hpl]  # unit 1 of layer 0, unit 0 of layer 1
        experts = [1, E + 2] if ne else []
        mask = torch.zeros(nh + ne, dtype=torch.bool)
        mask[heads] = True
        mask[[nh + e for e in experts]] = True
        ctl.freezer.apply(mask)
        ctl.policies["heads"].frozen = mask[:nh].clone()  # keep the controller's view (frozen_units) consistent
        ctl.policies["experts"].frozen = mask[nh:].clone()
        frozen_units = [units.heads[i] for i in heads] + [units.experts[e] for e in experts]
        frozen_params = [p for u in frozen_units for p in u.params]
        trained = [u for u in units.all() if all(u is not f for f in frozen_units)]
        w0 = [local(p).detach().clone() for p in frozen_params]
        s0 = opt_fragments(engine, stage, frozen_params)
        t0 = [[local(p).detach().clone() for p in u.params] for u in trained]
        snap = ctl.snapshot_frozen()
        for _ in range(steps):
            step()
        w_drift = max([float((a - local(p)).abs().max()) for a, p in zip(w0, frozen_params) if a.numel()] or [0.0])
        s1 = opt_fragments(engine, stage, frozen_params)
        s_drift = max([float((s0[k] - s1[k]).abs().max()) for k in s0 if s0[k].numel()] or [0.0])
        fragments = len(s0) // 3  # frozen params with a piece in this rank's optimizer partition
        state_missing = int(s0.keys() != s1.keys())
        api_drift = ctl.frozen_change(snap)
        moved = [max([float((a - local(p)).abs().max()) for a, p in zip(before, u.params) if a.numel()] or [0.0])
                 for before, u in zip(t0, trained)]
        moved = all_max(moved) if moved else []
        per_rank = gather((w_drift, s_drift, state_missing, fragments))
        w_drift, s_drift, state_missing = (max(r[i] for r in per_rank) for i in range(3))
        fragments = sum(r[3] for r in per_rank)
        skipped = int(getattr(engine, "skipped_steps", 0))
        losses_ok = all(math.isfinite(x) for x in losses)
        unmoved = [u.name for u, m in zip(trained, moved) if m <= 0.0]
        ok = (lam_ok and w_drift == 0.0 and s_drift == 0.0 and api_drift == 0.0 and state_missing == 0 and fragments > 0
              and not unmoved and losses_ok and engine.zero_optimization_stage() == stage)
        return {"check": "freeze", "case": f"{family}:z{stage}:{precision}", "ok": ok, "world": world, "ep_size": ep,
                "frozen_units": [u.name for u in frozen_units], "frozen_weight_drift": w_drift,
                "frozen_master_state_drift": s_drift, "frozen_change_api": api_drift,
                "optimizer_fragments_checked": fragments, "trained_units": len(trained),
                "trained_min_change": min(moved) if moved else None, "trained_unmoved": unmoved,
                "lambda_max_step0": [round(float(x), 6) for x in lam.tolist()],
                "expert_lambda_max_step0": None if elam is None else [round(float(x), 6) for x in elam.tolist()],
                "losses": losses,
                "skipped_steps": skipped,
                "detail": f"drift w={w_drift:g} master/adam={s_drift:g} api={api_drift:g}; "
                          f"{len(trained) - len(unmoved)}/{len(trained)} trained units moved; "
                          f"loss {losses[0]:.3f}->{losses[-1]:.3f}"}
    finally:
        release(engine)


# ----------------------------------------------------------------------------------------------------------------------
# 3. refresh cost: materialized vs ghost vs auto
# ----------------------------------------------------------------------------------------------------------------------
def check_refresh(size: str, precision: str, repeats: int, rtol: float) -> list[dict]:
    import mat_ds
    from mat_ds.config import ModelConfig
    from mat_ds.core import ghost
    from mat_ds.models.transformer import Transformer

    s = BENCH[size]
    n, seq = s["n"], s["T"]
    torch.manual_seed(0)
    model = Transformer(ModelConfig(arch="bert", n_layer=s["L"], n_head=s["H"], d_model=s["D"], dropout=0.0),
                        s["V"], seq)
    mat = {"policy": "mat", "warmup_steps": 10**6, "refresh_interval": 10**6, "probe_samples": n,
           "probe_gram": "auto"}
    cfg = ds_config(2, precision, mat, micro=n)
    engine = None
    rows = []
    try:
        engine, *_ = mat_ds.initialize(model=model, model_parameters=model.param_groups(0.01), config=cfg,
                                       probe_batch=batch(7, n, s["V"], seq))
        ctl = engine.mat
        layers = [m for mods in ctl.units.attention_layers.values() for m in mods]
        limit = ctl.cfg.probe_memory_mb << 20
        auto = [ghost.choose(m, n, seq, "auto", limit) for m in layers]
        cuda = on_gpu()
        reference = None
        for form in ("materialized", "ghost", "auto"):
            ctl.cfg.probe_gram = form
            times, peaks = [], []
            for _ in range(repeats + 1):  # the first call warms up kernels/allocator and is not counted
                if cuda:
                    torch.cuda.synchronize()
                    base = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                dist.barrier()
                t0 = time.perf_counter()
                ctl.refresh(0)
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
                if cuda:
                    peaks.append((torch.cuda.max_memory_allocated() - base) / 2**20)
            lam = ctl.last_probe.head_lambda_max()
            if reference is None:
                reference = lam
            rel = float(((lam - reference).abs() / reference.abs().clamp_min(1e-30)).max())
            seconds = max(gather(statistics.median(times[1:])))
            peak = max(gather(max(peaks[1:]))) if cuda else None
            ok = bool(torch.isfinite(lam).all()) and rel <= rtol
            rows.append({"check": "refresh", "case": f"{size}:{form}", "ok": ok, "probe_gram": form,
                         "seconds": round(seconds, 4), "peak_mb": None if peak is None else round(peak, 1),
                         "lambda_rel_vs_materialized": rel, "precision": precision,
                         "shape": {"layers": s["L"], "d_model": s["D"], "heads": s["H"], "T": seq, "n": n,
                                   "vocab": s["V"]},
                         "auto_choice": {"ghost": auto.count("ghost"), "materialized": auto.count("materialized")}
                         if form == "auto" else None,
                         "detail": f"{seconds * 1e3:.1f} ms"
                                   + (f", peak +{peak:.0f} MiB" if peak is not None else ", peak n/a (CPU)")
                                   + f", λ rel diff {rel:.1e}"
                                   + (f", auto chose ghost for {auto.count('ghost')}/{len(auto)} layers"
                                      if form == "auto" else "")})
    finally:
        release(engine)
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------------------------------
def table(rows: list[dict]) -> str:
    lines = [f"{'check':<9} {'case':<22} {'result':<6} detail", "-" * 100]
    for r in rows:
        result = "PASS" if r["ok"] else ("SKIP" if r.get("skipped") else "FAIL")
        lines.append(f"{r['check']:<9} {r['case']:<22} {result:<6} {r.get('detail', '')}")
    failed = sum(1 for r in rows if not r["ok"] and not r.get("skipped"))
    lines.append("-" * 100)
    lines.append(f"{len(rows)} checks, {failed} failed")
    return "\n".join(lines)


def report(paths: list[str]) -> int:
    """Print the table of one or more JSONL result files (the shell script adds its trainer row)."""
    rows = []
    for path in paths:
        with open(path, encoding="utf-8") as fh:
            rows += [json.loads(line) for line in fh if line.strip()]
    print(table(rows), flush=True)
    return 0 if rows and all(r["ok"] or r.get("skipped") for r in rows) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--local_rank", type=int, default=-1)
    parser.add_argument("--cases", default=DEFAULT_CASES, help="comma-separated family:stage:precision "
                        "(families own, switch, bert; stages 0-3; precisions fp32, bf16, fp16)")
    parser.add_argument("--freeze_steps", type=int, default=3)
    parser.add_argument("--bench_size", default="base", choices=sorted(BENCH) + ["none"])
    parser.add_argument("--bench_precision", default="bf16", choices=PRECISIONS)
    parser.add_argument("--bench_repeats", type=int, default=3)
    parser.add_argument("--lambda_rtol", type=float, default=2e-3)
    parser.add_argument("--out", default=None, help="Also write the rows here as JSON lines (rank 0).")
    parser.add_argument("--allow_cpu", action="store_true",
                        help="Dry run on CPU/gloo (fp16 cases only where DeepSpeed's CPU accelerator reports fp16).")
    parser.add_argument("--report", nargs="+", default=None, metavar="JSONL",
                        help="Only print the table of these result files and exit 0/1 (no process group).")
    args = parser.parse_args()
    if args.report:
        return report(args.report)
    if not torch.cuda.is_available() and not args.allow_cpu:
        print("gpu_check: no CUDA device visible to torch; nothing to check here (use --allow_cpu for a CPU dry run)",
              file=sys.stderr, flush=True)
        return 2

    from mat_ds.distributed import init_distributed, shutdown_distributed

    init_distributed(timeout_minutes=10)
    if torch.cuda.is_available():  # one GPU per rank before the first NCCL collective (DeepSpeed's engine does it later)
        from deepspeed.accelerator import get_accelerator
        get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", "0")))
    rank = dist.get_rank()
    rows: list[dict] = []
    fp16_ranks = gather(fp16_supported())  # every rank's answer; fp16 runs only where all of them say yes
    fp16_ok = all(fp16_ranks)

    def run(name: str, case: str, fn) -> None:
        t0 = time.perf_counter()
        try:
            out = fn()
        except Exception as exc:  # noqa: BLE001 - one failing check must not hide the others
            traceback.print_exc()
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            out = {"check": name, "case": case, "ok": False, "detail": f"{type(exc).__name__}: {first}"[:200]}
        for row in out if isinstance(out, list) else [out]:
            row["seconds_total"] = round(time.perf_counter() - t0, 2)
            row["fp16_supported"] = fp16_ranks
            rows.append(row)
            if rank == 0:
                print("GPU_CHECK " + json.dumps(row), flush=True)

    run("backend", "-", check_backend)
    for spec in [c for c in args.cases.split(",") if c.strip()]:
        family, stage, precision = spec.strip().split(":")
        case = f"{family}:z{stage}:{precision}"
        if precision == "fp16" and not fp16_ok:
            from deepspeed.accelerator import get_accelerator
            row = {"check": "freeze", "case": case, "ok": False, "skipped": True, "fp16_supported": fp16_ranks,
                   "detail": f"skipped: DeepSpeed's {get_accelerator().device_name()} accelerator reports no fp16 "
                             f"here (ranks: {fp16_ranks})"}
            rows.append(row)
            if rank == 0:
                print("GPU_CHECK " + json.dumps(row), flush=True)
            continue
        run("freeze", case, lambda: check_freeze(family, int(stage), precision, args.freeze_steps))
    if args.bench_size != "none":
        precision = args.bench_precision if fp16_ok or args.bench_precision != "fp16" else "fp32"
        run("refresh", args.bench_size, lambda: check_refresh(args.bench_size, precision, args.bench_repeats,
                                                              args.lambda_rtol))
    failed = sum(1 for r in rows if not r["ok"] and not r.get("skipped"))
    if rank == 0:
        print(table(rows), flush=True)
        if args.out:
            with open(args.out, "w", encoding="utf-8") as fh:
                fh.writelines(json.dumps(r) + "\n" for r in rows)
    shutdown_distributed()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
