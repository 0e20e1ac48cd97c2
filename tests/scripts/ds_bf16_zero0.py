"""Plain DeepSpeed, no mat_ds: the same tiny MLP-LM in fp32 vs bf16, ZeRO stage 0 vs 1, accumulation 2, 8 steps.

    deepspeed --num_gpus 2 tests/scripts/ds_bf16_zero0.py 1.0      # the last argument: gradient_clipping

Why it exists: bf16 without ZeRO (DeepSpeed's DDP_BFLOAT16 path, FP16_UnfusedOptimizer, bf16 gradient accumulation)
tracks fp32 far less closely than bf16 with ZeRO-1 even with no MAT at all (DeepSpeed 0.19.8, 2 gloo ranks, measured
2026-11-23: max |loss - fp32| 0.345 for stage 0 vs 0.0048 for stage 1, clipping 1.0 or 0). tests/test_precision.py
therefore bounds mat_ds's bf16 ZeRO-0 cells by a looser tolerance than its ZeRO 1-3 cells. Where DeepSpeed's accelerator
reports fp16 (``get_accelerator().is_fp16_supported()``) fp16 runs too (dynamic loss scale from 2^8, as
tests/scripts/precision_check.py): the same FP16_UnfusedOptimizer path without ZeRO drifts alike (measured 2026-12-03 on
a CPU with fp16, clipping 1.0: 0.355 for stage 0 vs 0.0002 for stage 1), the bound of the fp16 ZeRO-0 cells.
"""
import json, sys, torch, deepspeed, torch.distributed as dist
from torch import nn
deepspeed.init_distributed(dist_backend="gloo")
rank = dist.get_rank()
def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(256, 64), nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 256))
out = {}
from deepspeed.accelerator import get_accelerator
for prec in ("fp32", "bf16") + (("fp16",) if get_accelerator().is_fp16_supported() else ()):
    for stage in (0, 1):
        m = model()
        cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "gradient_clipping": float(sys.argv[-1]),
               "optimizer": {"type": "AdamW", "params": {"lr": 5e-3, "weight_decay": 0.01, "torch_adam": True}},
               "zero_optimization": {"stage": stage}}
        if prec == "bf16":
            cfg["bf16"] = {"enabled": True}
        if prec == "fp16":
            cfg["fp16"] = {"enabled": True, "initial_scale_power": 8, "loss_scale_window": 100, "hysteresis": 2}
        eng, *_ = deepspeed.initialize(model=m, model_parameters=m.parameters(), config=cfg)
        g = torch.Generator().manual_seed(1 + rank)
        batches = [torch.randint(0, 256, (4, 16), generator=g) for _ in range(2)]
        losses = []
        for step in range(8):
            tot = 0.0
            for x in batches:
                logits = eng(x)
                loss = nn.functional.cross_entropy(logits.float().view(-1, 256), x.view(-1))
                eng.backward(loss); eng.step(); tot += float(loss) / 2
            losses.append(tot)
        out[f"{prec}:z{stage}"] = losses
if rank == 0:
    for k, v in out.items():
        d = [abs(a - b) for a, b in zip(v, out[f"fp32:{k.split(':')[1]}"])]
        print("DSBF16", k, "max|loss - fp32 same stage|", round(max(d), 5), [round(x, 4) for x in v])
