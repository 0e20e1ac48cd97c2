"""A Hugging Face model trained with MAT through `transformers.Trainer` + DeepSpeed ZeRO-2: BERT masked LM (heads) or
Mixtral causal LM (KV-group units + top-2 routed experts, fused experts converted to per-expert parameters).

    deepspeed --num_gpus 2 examples/hf_trainer_lm.py --output_dir runs/hf_trainer_bert --max_steps 100
    deepspeed --num_gpus 2 examples/hf_trainer_lm.py --output_dir runs/hf_trainer_bert --max_steps 100 \\
        --resume_from_checkpoint runs/hf_trainer_bert/checkpoint-10
    deepspeed --num_gpus 2 examples/hf_trainer_lm.py --model mixtral --output_dir runs/hf_trainer_mixtral

A plain Trainer script; the one MAT line is `MATTrainer(...)` instead of `Trainer(...)` (mat_ds/hf_trainer.py), with a
"mat" block in the DeepSpeed JSON (examples/ds_config_hf_trainer.json: HF "auto" values, ZeRO-2). MAT metrics
(`mat/active_fraction`, `mat/lambda_max/L{l}H{h}` after refreshes, ...) land in `trainer.state.log_history` and, through
`report_to=["wandb"]`, in W&B as `train/mat/...` (offline: WANDB_MODE=offline; runs under <output_dir>/wandb).
Checkpoints (`checkpoint-N`, every --save_steps) carry MAT's state; --resume_from_checkpoint continues exactly.

At the end rank 0 writes <output_dir>/log_history.json and prints `MAT_SUMMARY {json}` (read by tests/test_hf_trainer.py).
"""
import argparse
import json
import os

import torch
import torch.distributed as dist
from datasets import Dataset
from transformers import (BertConfig, BertForMaskedLM, MixtralConfig, MixtralForCausalLM, TrainerCallback,
                          TrainingArguments, default_data_collator)

import mat_ds
from mat_ds.config import DataConfig
from mat_ds.data import make_batch, prepare_data
from mat_ds.hf_trainer import MATTrainer

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="bert", choices=["bert", "mixtral"])
parser.add_argument("--output_dir", default="runs/hf_trainer_bert")
parser.add_argument("--deepspeed", default=os.path.join(os.path.dirname(__file__), "ds_config_hf_trainer.json"))
parser.add_argument("--max_steps", type=int, default=100)
parser.add_argument("--per_device_train_batch_size", type=int, default=8)
parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
parser.add_argument("--learning_rate", type=float, default=2e-3)
parser.add_argument("--logging_steps", type=int, default=1)
parser.add_argument("--save_steps", type=int, default=10)
parser.add_argument("--report_to", default="wandb", choices=["wandb", "none"])
parser.add_argument("--resume_from_checkpoint", default=None)
parser.add_argument("--cache_dir", default=".cache/mat_ds", help="tokenizer and tokenized-corpus cache")
parser.add_argument("--seed", type=int, default=1234)
parser.add_argument("--local_rank", type=int, default=-1)  # passed by the deepspeed launcher
cli = parser.parse_args()

mat_ds.init_distributed()
rank = dist.get_rank()
os.environ.setdefault("WANDB_DIR", cli.output_dir)  # W&B run files next to the checkpoints
os.makedirs(cli.output_dir, exist_ok=True)

# Data: mat_ds's embedded corpus as packed 64-token blocks; MLM masked once (mask of block i seeded by (seed, i)),
# causal LM labels = input_ids (HF shifts inside the loss).
data = prepare_data(DataConfig(seq_len=64, vocab_size=1024, cache_dir=cli.cache_dir), is_main=rank == 0,
                    barrier=dist.barrier)
tok = data.tokenizer
blocks = make_batch(data.train, torch.arange(len(data.train)), objective="mlm" if cli.model == "bert" else "clm",
                    tokenizer=tok, mlm_probability=0.15, seed=cli.seed, shuffle=False)
train_dataset = Dataset.from_dict({"input_ids": blocks["input_ids"].tolist(), "labels": blocks["labels"].tolist(),
                                   "attention_mask": torch.ones_like(blocks["input_ids"]).tolist()})

# Model: tiny, random-init, dropout 0, built BEFORE TrainingArguments (under ZeRO-3 HF would partition it).
torch.manual_seed(cli.seed)
if cli.model == "bert":
    model = BertForMaskedLM(BertConfig(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, intermediate_size=128, max_position_embeddings=64,
                                       pad_token_id=tok.pad_id, hidden_dropout_prob=0.0,
                                       attention_probs_dropout_prob=0.0))
else:
    model = MixtralForCausalLM(MixtralConfig(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                                             num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
                                             pad_token_id=tok.pad_id, bos_token_id=None, eos_token_id=None))
model.accepts_loss_kwargs = False  # the LM loss is a batch mean: the Trainer must average it over accumulation

args = TrainingArguments(
    output_dir=cli.output_dir, deepspeed=cli.deepspeed, max_steps=cli.max_steps,
    per_device_train_batch_size=cli.per_device_train_batch_size,
    gradient_accumulation_steps=cli.gradient_accumulation_steps, learning_rate=cli.learning_rate, warmup_steps=5,
    weight_decay=0.01, adam_beta2=0.98, max_grad_norm=1.0, logging_steps=cli.logging_steps, save_strategy="steps",
    save_steps=cli.save_steps, report_to=[] if cli.report_to == "none" else [cli.report_to],
    run_name=os.path.basename(os.path.normpath(cli.output_dir)), seed=cli.seed, dataloader_num_workers=0,
    disable_tqdm=True,
    use_cpu=not torch.cuda.is_available())  # CPU-only ranks (CI): accelerate's gloo process group, DeepSpeed on top


# Verification (what tests/test_hf_trainer.py reads; cheap, optional in your own script) ---------------------------
class MATChecks(TrainerCallback):
    """(1) Frozen means frozen: after every optimizer step, max |ΔW| over the units frozen during it (snapshot after the
    previous step), logged per logging window as `mat/frozen_max_abs_change` with `mat/frozen_units_checked`.
    (2) Decisions only at optimizer-step boundaries: the training forwards in which MAT refreshed (index of the
    micro-batch, engine step), printed in MAT_SUMMARY."""

    def __init__(self, trainer):
        self.trainer, self.snapshot, self.drift, self.checked = trainer, None, 0.0, 0
        self.forwards, self.last_total, self.refreshes = 0, None, []

    def on_train_begin(self, args, state, control, **kwargs):
        mat = self.trainer.mat
        if mat is None:
            return  # a DeepSpeed JSON without a "mat" block: plain Trainer
        self.last_total = mat.refresh_seconds_total
        self.trainer.model_wrapped.register_forward_hook(self._after_forward)

    def _after_forward(self, engine, _args, _out):
        if not (engine.training and torch.is_grad_enabled()):
            return
        total = engine.mat.refresh_seconds_total
        if total != self.last_total:  # MAT's pre-hook refreshed before this forward
            self.refreshes.append({"forward": self.forwards, "engine_step": int(engine.global_steps)})
            self.last_total = total
        self.forwards += 1

    def on_step_end(self, args, state, control, **kwargs):
        mat = self.trainer.mat
        if mat is None:
            return
        if self.snapshot is not None:
            now = {(u.kind, u.layer, u.index) for u in mat.frozen_units()}
            self.checked = max(self.checked, len(now & set(self.snapshot)))
            self.drift = max(self.drift, mat.frozen_change(self.snapshot))  # a collective: every rank is here
        self.snapshot = mat.snapshot_frozen()
        if control.should_log:
            self.trainer.log_next({"mat/frozen_max_abs_change": self.drift, "mat/frozen_units_checked": self.checked})
            self.drift, self.checked = 0.0, 0


trainer = MATTrainer(model=model, args=args, train_dataset=train_dataset, data_collator=default_data_collator)
checks = MATChecks(trainer)
trainer.add_callback(checks)
trainer.train(resume_from_checkpoint=cli.resume_from_checkpoint)

if rank == 0:
    with open(os.path.join(cli.output_dir, "log_history.json"), "w") as fh:
        json.dump(trainer.state.log_history, fh, indent=1)
    engine = trainer.model_wrapped
    print("MAT_SUMMARY " + json.dumps({
        "global_step": trainer.state.global_step, "engine_steps": int(engine.global_steps),
        "gradient_accumulation_steps": engine.gradient_accumulation_steps(), "forwards": checks.forwards,
        "refreshes": checks.refreshes,
        "frozen": [u.name for u in trainer.mat.frozen_units()] if trainer.mat is not None else None}), flush=True)
    if cli.report_to == "wandb":
        import wandb
        wandb.finish()  # flush the (offline) run before the process group goes away
mat_ds.shutdown_distributed()
