"""What does the wrapper cost when it freezes nothing? Side by side in ONE run, ratios printed.

    deepspeed --num_gpus 2 benchmarks/wrapper_overhead.py [--rounds 6] [--steps 2] \
        [--hidden 256 --layers 4 --heads 4 --seq 128 --micro 8 --vocab 8192]

1. Engines (both ranks, ZeRO-2, AdamW, fp32): the SAME HF ``BertForMaskedLM`` (random init from a config, same seed,
   default dropout) trained through

   * ``plain``  -- ``deepspeed.initialize``;
   * ``wrapper`` -- ``mat_ds.initialize`` with ``"mat": {"policy": "full"}``: converted model (head-wise linears), MAT's
     forward pre-hook on, nothing ever frozen;
   * ``mat_idle`` -- ``mat_ds.initialize`` with ``"mat": {"policy": "mat", "refresh_interval": 10**6}``: probe set
     captured from the batches, one refresh at step 0 (in the warm-up), then MAT's per-step work between refreshes.

   * ``plain_again`` (only with ``--engines ... plain_again``) -- a second plain engine: the A/A control, its ratio
     to ``plain`` is the measurement's noise floor.

   Full training steps (forward + backward + step) in blocks of ``--steps`` per engine; the engines take turns
   (order reversed every round) so drift in machine load hits all of them alike; the first ``--warmup_rounds`` rounds
   are dropped. Reported: median tokens/s per engine, and the median over rounds of each round's
   ``tokens/s(engine) / tokens/s(plain)`` (the paired ratio; the acceptance target for the wrapper is >= 0.97), the
   fastest block's ratio, and the same ratio on process CPU time per step (steadier on a shared machine).

2. Single process, no DeepSpeed (every rank runs it on its own, identically; rank 0's numbers are the result, the other
   ranks' show the noise): forward + backward of the unconverted HF model vs a ``copy.deepcopy`` of it converted with
   ``mat_ds.convert_model``, alternating single steps, for BERT (masked LM), GPT-2 and LLaMA with grouped-query
   attention (causal LM). Reported: the median over pairs of ``t(unconverted) / t(converted)``, i.e. converted
   throughput relative to unconverted (target >= 0.95), on wall-clock and on process CPU time (CPU time does not count
   the time the process waited for a core, so it is the steadier number on a shared machine), plus best-vs-best
   (fastest step of each). Also the largest |logit difference| of the two models in eval mode (the conversion must not
   change the function).

Output: a table and one ``WRAPPER_OVERHEAD {json}`` line (rank 0). ``--profile`` adds a torch.profiler table of the
converted vs unconverted forward+backward per family (where the time goes). Timings are printed, never asserted.
Without the launcher (``python benchmarks/wrapper_overhead.py``) only the single-process section runs.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
import deepspeed
import torch
import torch.distributed as dist

import mat_ds
from mat_ds.distributed import exit_process

FAMILIES = ("bert", "gpt2", "llama")


def accel_device() -> torch.device:
    """Where the single-process section runs: the launched rank's accelerator (DeepSpeed's choice), else CUDA if
    present, else CPU. On a GPU every timing below is taken after a device synchronize."""
    from deepspeed.accelerator import get_accelerator

    name = get_accelerator().device_name()
    return torch.device(get_accelerator().current_device_name()) if name != "cpu" else torch.device("cpu")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------------------------------
# Models and batches
# ----------------------------------------------------------------------------------------------------------------------
def make_model(family: str, args) -> torch.nn.Module:
    """A tiny but GEMM-dominated HF model from a config (random init, ``args.seed``), in training mode."""
    from transformers import (BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                              LlamaForCausalLM)

    torch.manual_seed(args.seed)
    d, L, H, T, V = args.hidden, args.layers, args.heads, args.seq, args.vocab
    if family == "bert":
        model = BertForMaskedLM(BertConfig(vocab_size=V, hidden_size=d, num_hidden_layers=L, num_attention_heads=H,
                                           intermediate_size=4 * d, max_position_embeddings=T))
    elif family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=T, n_embd=d, n_layer=L, n_head=H))
    elif family == "llama":  # grouped-query attention: H query heads share H/2 key/value heads (MAT unit = KV group)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=d, intermediate_size=(8 * d // 3 + 63) // 64 * 64,
                                             num_hidden_layers=L, num_attention_heads=H,
                                             num_key_value_heads=max(1, H // 2), max_position_embeddings=T))
    else:
        raise ValueError(family)
    return model.train()


def make_batches(family: str, args, rank: int, n: int = 4) -> list[dict]:
    """``n`` fixed batches of this rank: random tokens; MLM labels on 15% of positions (BERT) or causal LM labels."""
    gen = torch.Generator().manual_seed(1000 * args.seed + rank)
    out = []
    for _ in range(n):
        ids = torch.randint(5, args.vocab, (args.micro, args.seq), generator=gen)
        if family == "bert":
            masked = torch.rand(args.micro, args.seq, generator=gen) < 0.15
            labels = torch.where(masked, ids, torch.full_like(ids, -100))
            ids = torch.where(masked, torch.full_like(ids, 4), ids)  # [MASK]-like token at the predicted positions
        else:
            labels = ids.clone()
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


# ----------------------------------------------------------------------------------------------------------------------
# 1. Engines
# ----------------------------------------------------------------------------------------------------------------------
ENGINES = {
    "plain": None,
    "plain_again": None,  # optional A/A control (not run by default): a second plain engine shows the noise floor
    "wrapper": {"policy": "full"},
    "mat_idle": {"policy": "mat", "refresh_interval": 10**6, "probe_samples": 16},
}


def ds_config(args, mat_block) -> dict:
    cfg = {"train_micro_batch_size_per_gpu": args.micro, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
           "steps_per_print": 10**9, "wall_clock_breakdown": False,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.01, "torch_adam": True}},
           "zero_optimization": {"stage": 2}}
    if mat_block is not None:
        cfg["mat"] = dict(mat_block)
    return cfg


def bench_engines(args, rank: int, world: int) -> dict:
    engines = {}
    for name in args.engines:
        model = make_model("bert", args)  # same seed: the same initial weights for every engine
        init = deepspeed.initialize if ENGINES[name] is None else mat_ds.initialize
        engines[name], _, _, _ = init(model=model, model_parameters=model.parameters(),
                                      config=ds_config(args, ENGINES[name]))
    device = next(iter(engines.values())).device
    batches = [{k: v.to(device) for k, v in b.items()} for b in make_batches("bert", args, rank)]
    tokens = args.steps * args.micro * args.seq * world  # per block, all ranks
    rates: dict[str, list[float]] = {name: [] for name in engines}
    cpu: dict[str, list[float]] = {name: [] for name in engines}
    i = 0
    for rnd in range(args.warmup_rounds + args.rounds):
        order = list(engines) if rnd % 2 == 0 else list(reversed(engines))
        for name in order:
            engine = engines[name]
            sync(device)
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                loss = engine(**batches[i % len(batches)]).loss
                engine.backward(loss)
                engine.step()
                i += 1
            sync(device)
            dist.barrier()
            wall, cpu_s = time.perf_counter() - t0, time.process_time() - c0
            if rnd >= args.warmup_rounds:
                rates[name].append(tokens / wall)
                cpu[name].append(cpu_s / args.steps)
    out: dict = {"engines": {}}
    for name in engines:
        r = {"tokens_per_s": round(statistics.median(rates[name]), 1),
             "tokens_per_s_all": [round(v, 1) for v in rates[name]],
             "cpu_s_per_step": round(statistics.median(cpu[name]), 4)}
        if name != "plain" and "plain" in engines:
            paired = [a / b for a, b in zip(rates[name], rates["plain"])]
            r["ratio_vs_plain"] = round(statistics.median(paired), 4)  # median of per-round paired ratios
            r["ratio_vs_plain_min_max"] = [round(min(paired), 4), round(max(paired), 4)]
            r["cpu_ratio_vs_plain"] = round(statistics.median(
                [b / a for a, b in zip(cpu[name], cpu["plain"])]), 4)
            r["best_ratio_vs_plain"] = round(max(rates[name]) / max(rates["plain"]), 4)  # fastest block vs fastest
        out["engines"][name] = r
    mat = getattr(engines.get("mat_idle"), "mat", None)
    if mat is not None:
        out["mat_idle_refresh_seconds_total"] = round(mat.refresh_seconds_total, 3)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# 2. Single process: unconverted vs converted forward + backward
# ----------------------------------------------------------------------------------------------------------------------
def fwd_bwd(model: torch.nn.Module, batch: dict) -> None:
    model(**batch).loss.backward()
    for p in model.parameters():
        p.grad = None


def bench_conversion(family: str, args, rank: int, device: torch.device) -> dict:
    plain = make_model(family, args)
    conv = copy.deepcopy(plain)
    conversion = mat_ds.convert_model(conv)
    plain.to(device), conv.to(device)
    batches = [{k: v.to(device) for k, v in b.items()} for b in make_batches(family, args, rank)]
    with torch.no_grad():  # the conversion must not change the function
        plain.eval(), conv.eval()
        diff = float((plain(input_ids=batches[0]["input_ids"]).logits
                      - conv(input_ids=batches[0]["input_ids"]).logits).abs().max())
        plain.train(), conv.train()
    models = {"unconverted": plain, "converted": conv}
    wall: dict[str, list[float]] = {k: [] for k in models}
    cpu: dict[str, list[float]] = {k: [] for k in models}
    for j in range(args.single_warmup + args.single_pairs):
        order = ("unconverted", "converted") if j % 2 == 0 else ("converted", "unconverted")
        for name in order:
            torch.manual_seed(j)  # the same dropout masks for both
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            fwd_bwd(models[name], batches[j % len(batches)])
            sync(device)
            w, c = time.perf_counter() - t0, time.process_time() - c0
            if j >= args.single_warmup:
                wall[name].append(w)
                cpu[name].append(c)
    ratio = [a / b for a, b in zip(wall["unconverted"], wall["converted"])]
    cpu_ratio = [a / b for a, b in zip(cpu["unconverted"], cpu["converted"])]
    return {"family": conversion.family, "max_abs_logit_diff": diff,
            "s_unconverted": round(statistics.median(wall["unconverted"]), 4),
            "s_converted": round(statistics.median(wall["converted"]), 4),
            "ratio": round(statistics.median(ratio), 4),
            "ratio_min_max": [round(min(ratio), 4), round(max(ratio), 4)],
            "cpu_ratio": round(statistics.median(cpu_ratio), 4),
            "best_ratio": round(min(wall["unconverted"]) / min(wall["converted"]), 4),
            "best_cpu_ratio": round(min(cpu["unconverted"]) / min(cpu["converted"]), 4)}


def bench_layers(args) -> dict:
    """One attention projection of each family, original module vs its ``HeadwiseLinear``: forward + backward (all
    units training) on ``micro * seq`` tokens, alternating single calls, process CPU time, one thread. Isolates what the
    head-wise layer itself costs (weight assembly, per-unit gradients, Python) from the rest of the model."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    from mat_ds.adapters.hf_gpt2 import qkv_layout
    from mat_ds.core.headwise import HeadwiseLinear

    torch.manual_seed(args.seed)
    d, H = args.hidden, args.heads
    conv = Conv1D(3 * d, d)
    nn.init.normal_(conv.weight, std=0.02)
    cases = {  # name: (original, converted)
        "bert query (out, bias)": (lin := nn.Linear(d, d), HeadwiseLinear.from_linear(lin, H, "out")),
        "bert output.dense (in, shared bias)": (lin := nn.Linear(d, d), HeadwiseLinear.from_linear(lin, H, "in")),
        "gpt2 c_attn (blocked QKV layout)": (conv, HeadwiseLinear.from_conv1d(conv, H, "out", layout=qkv_layout(d, H))),
        "llama q_proj (GQA units, no bias)": (lin := nn.Linear(d, d, bias=False),
                                              HeadwiseLinear.from_linear(lin, max(1, H // 2), "out")),
    }
    x = torch.randn(args.micro * args.seq, d, requires_grad=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # CPU time of one thread: no OpenMP spinning in the numbers
    out = {}
    for name, (orig, hw) in cases.items():
        dy = torch.randn(x.shape[0], hw.d_out)
        cpu: dict[str, list[float]] = {"original": [], "headwise": []}
        for j in range(args.layer_reps + 5):
            for key in (("original", "headwise") if j % 2 == 0 else ("headwise", "original")):
                module = orig if key == "original" else hw
                c0 = time.process_time()
                module(x).backward(dy)
                c = time.process_time() - c0
                x.grad = None
                for p in module.parameters():
                    p.grad = None
                if j >= 5:
                    cpu[key].append(c)
        out[name] = {"ms_original": round(1e3 * statistics.median(cpu["original"]), 3),
                     "ms_headwise": round(1e3 * statistics.median(cpu["headwise"]), 3),
                     "ratio": round(statistics.median([a / b for a, b in zip(cpu["original"], cpu["headwise"])]), 4)}
    torch.set_num_threads(threads)
    return out


def profile_conversion(family: str, args, rows: int = 12) -> str:
    """torch.profiler tables (self CPU time by op) of a few forward+backward steps, unconverted vs converted."""
    from torch.profiler import ProfilerActivity, profile

    plain = make_model(family, args)
    conv = copy.deepcopy(plain)
    mat_ds.convert_model(conv)
    batch = make_batches(family, args, 0)[0]
    text = []
    for name, model in (("unconverted", plain), ("converted", conv)):
        fwd_bwd(model, batch)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                fwd_bwd(model, batch)
        text.append(f"--- {family} {name}: self CPU time over 3 forward+backward steps\n"
                    + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))
    return "\n".join(text)


# ----------------------------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--local_rank", type=int, default=-1)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--micro", type=int, default=8, help="micro-batch per rank (and the single-process batch)")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2, help="training steps per engine per round")
    parser.add_argument("--rounds", type=int, default=6, help="measured rounds (each: one block per engine)")
    parser.add_argument("--warmup_rounds", type=int, default=1)
    parser.add_argument("--engines", nargs="*", default=["plain", "wrapper", "mat_idle"], choices=list(ENGINES),
                        help="engines to compare (none: skip the section); 'plain' is the reference")
    parser.add_argument("--families", nargs="*", default=list(FAMILIES), choices=FAMILIES,
                        help="single-process section (none: skip it)")
    parser.add_argument("--single_pairs", type=int, default=8, help="measured (unconverted, converted) pairs")
    parser.add_argument("--single_warmup", type=int, default=2)
    parser.add_argument("--layer_reps", type=int, default=60,
                        help="measured calls per layer in the per-layer section (0: skip it)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads per process (0: CPU cores / local processes, at least 1)")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler tables (rank 0)")
    args = parser.parse_args()

    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if launched:
        mat_ds.init_distributed()
    rank, world = (dist.get_rank(), dist.get_world_size()) if launched else (0, 1)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world)) if launched else 1
    threads = args.threads or max(1, (os.cpu_count() or 1) // local)
    torch.set_num_threads(threads)

    result: dict = {"model": {"hidden": args.hidden, "layers": args.layers, "heads": args.heads, "seq": args.seq,
                              "micro": args.micro, "vocab": args.vocab},
                    "world_size": world, "threads_per_process": threads,
                    "load_avg_before": round(os.getloadavg()[0], 2)}
    t_start = time.perf_counter()
    if launched and args.engines:
        result.update(bench_engines(args, rank, world))
        result["steps_per_block"], result["rounds"] = args.steps, args.rounds
    device = accel_device() if launched else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    single = {family: bench_conversion(family, args, rank, device) for family in args.families}
    if launched and world > 1:  # every rank measured the same thing: its spread says how noisy the machine was
        gathered: list = [None] * world
        dist.all_gather_object(gathered, {f: v["ratio"] for f, v in single.items()})
        for family in single:
            single[family]["ratio_per_rank"] = [g[family] for g in gathered]
    result["single_process"] = single
    if args.layer_reps and device.type == "cpu":  # a CPU-time measurement: meaningless for GPU kernels
        result["layers"] = bench_layers(args)
    result["load_avg_after"] = round(os.getloadavg()[0], 2)
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    if rank == 0:
        print(report(result), flush=True)
        print("WRAPPER_OVERHEAD " + json.dumps(result), flush=True)
        if args.profile:
            for family in args.families:
                print(profile_conversion(family, args), flush=True)
    if launched:
        mat_ds.shutdown_distributed()


def report(r: dict) -> str:
    m = r["model"]
    lines = [f"wrapper overhead: BERT/GPT-2/LLaMA d{m['hidden']} {m['layers']}L {m['heads']}H T{m['seq']} "
             f"micro {m['micro']} vocab {m['vocab']}, on {r.get('device', 'cpu')}, {r['world_size']} rank(s) x {r['threads_per_process']} "
             f"thread(s), load avg {r['load_avg_before']} -> {r['load_avg_after']}, {r['seconds']} s"]
    if "engines" in r:
        lines += ["", "| engine (ZeRO-2, BERT MLM) | tokens/s (median) | ratio vs plain (paired median) | range | "
                      "best block vs best | CPU-time ratio |", "|---|---|---|---|---|---|"]
        for name, e in r["engines"].items():
            lines.append(f"| {name} | {e['tokens_per_s']:.0f} | {e.get('ratio_vs_plain', 1.0):.3f} | "
                         f"{e.get('ratio_vs_plain_min_max', '-')} | {e.get('best_ratio_vs_plain', 1.0):.3f} | "
                         f"{e.get('cpu_ratio_vs_plain', 1.0):.3f} |")
    if r.get("single_process"):
        lines += ["", "| family (1 process) | s/fwd+bwd unconverted | converted | ratio (paired median) | range | "
                      "best vs best | CPU-time ratio (median, best) | per rank | max logit diff |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for family, s in r["single_process"].items():
            lines.append(f"| {family} | {s['s_unconverted']:.4f} | {s['s_converted']:.4f} | {s['ratio']:.3f} | "
                         f"{s['ratio_min_max']} | {s['best_ratio']:.3f} | {s['cpu_ratio']:.3f}, "
                         f"{s['best_cpu_ratio']:.3f} | {s.get('ratio_per_rank', '-')} | {s['max_abs_logit_diff']:.1e} |")
    if r.get("layers"):
        lines += ["", "| projection (1 process, all units training) | ms fwd+bwd original | head-wise | ratio (paired "
                      "median, CPU time) |", "|---|---|---|---|"]
        for name, v in r["layers"].items():
            lines.append(f"| {name} | {v['ms_original']:.2f} | {v['ms_headwise']:.2f} | {v['ratio']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
    exit_process(0)  # no interpreter teardown after the work is done: see mat_ds.distributed.exit_process
