"""Masked-LM training of a Hugging Face BERT with MAT (Modular Adaptive Training) inside DeepSpeed.

    deepspeed --num_gpus 2 examples/hf_bert_mlm.py --steps 100 [--model_dir DIR] [--save_dir ckpt]

The training loop is the plain DeepSpeed one; the only change is `mat_ds.initialize` instead of
`deepspeed.initialize`, with a "mat" block in the DeepSpeed JSON. MAT measures each attention head's λmax on a probe
set it takes from the first training batches, and freezes the heads that learn slowly (see examples/README.md).
"""
import argparse
import json
import os

import torch
import torch.distributed as dist
from transformers import AutoConfig, AutoModelForMaskedLM, BertConfig, BertForMaskedLM

import mat_ds
from mat_ds.config import DataConfig
from mat_ds.data import global_positions, make_batch, prepare_data

parser = argparse.ArgumentParser()
parser.add_argument("--model_dir", default=None, help="local HF model directory (config.json, with or without weights)")
parser.add_argument("--deepspeed_config", default=os.path.join(os.path.dirname(__file__), "ds_config_mat.json"))
parser.add_argument("--steps", type=int, default=100)
parser.add_argument("--save_dir", default=None, help="checkpoint here at the end (and resume from it if it exists)")
parser.add_argument("--save_interval", type=int, default=0, help="also checkpoint every N steps (0 = only at the end)")
parser.add_argument("--cache_dir", default=".cache/mat_ds", help="tokenizer and tokenized-corpus cache")
parser.add_argument("--seed", type=int, default=1234)
parser.add_argument("--local_rank", type=int, default=-1)  # passed by the deepspeed launcher
args = parser.parse_args()

mat_ds.init_distributed()
rank, world = dist.get_rank(), dist.get_world_size()

# Data: the embedded corpus, a SentencePiece tokenizer and packed blocks [N, 64]. Replace with your own DataLoader.
data = prepare_data(DataConfig(seq_len=64, vocab_size=1024, cache_dir=args.cache_dir), is_main=rank == 0,
                    barrier=dist.barrier)
tok = data.tokenizer


def get_batch(step):  # a function of the step (and rank): a resumed run sees the same data
    positions = global_positions(step, 0, rank, world, engine.train_micro_batch_size_per_gpu(), 1)
    batch = make_batch(data.train, positions, objective="mlm", tokenizer=tok, mlm_probability=0.15, seed=args.seed)
    return {**batch, "attention_mask": torch.ones_like(batch["input_ids"])}


# Model: a local HF directory (weights -> from_pretrained, config.json only -> random init), else a tiny BERT.
torch.manual_seed(args.seed)
if args.model_dir and any(os.path.exists(os.path.join(args.model_dir, f)) for f in
                          ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")):
    model = AutoModelForMaskedLM.from_pretrained(args.model_dir)
elif args.model_dir:
    model = AutoModelForMaskedLM.from_config(AutoConfig.from_pretrained(args.model_dir))
else:
    model = BertForMaskedLM(BertConfig(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, intermediate_size=128, max_position_embeddings=64,
                                       pad_token_id=tok.pad_id))
assert model.config.vocab_size >= tok.vocab_size, "the model's vocabulary is smaller than the tokenizer's"

engine, *_ = mat_ds.initialize(model=model, model_parameters=model.parameters(), config=args.deepspeed_config)
if args.save_dir and os.path.isfile(os.path.join(args.save_dir, "latest")):
    engine.load_checkpoint(args.save_dir)  # weights, optimizer, scheduler and MAT state (frozen heads, probe set)
    if rank == 0:
        print("RESUMED " + json.dumps({"step": engine.global_steps, **engine.mat.metrics()}), flush=True)

engine.train()
for step in range(engine.global_steps, args.steps):
    torch.manual_seed(args.seed + 1000 * step + rank)  # dropout masks are a function of the step, too
    loss = engine(**get_batch(step)).loss
    engine.backward(loss)
    engine.step()
    m = engine.mat.metrics()  # λmax per head on refresh steps, the frozen set always
    if rank == 0:
        print("STEP " + json.dumps({
            "step": step, "loss": loss.item(), "active_fraction": m["mat/active_fraction"],
            "frozen_params": m["mat/frozen_params"], "lambda_keys": sum(k.startswith("mat/lambda_max/") for k in m),
            "frozen": [u.name for u in engine.mat.frozen_units()]}), flush=True)
    if args.save_dir and args.save_interval and engine.global_steps % args.save_interval == 0:
        engine.save_checkpoint(args.save_dir)

if args.save_dir and not (args.save_interval and engine.global_steps % args.save_interval == 0):
    engine.save_checkpoint(args.save_dir)
mat_ds.shutdown_distributed()
