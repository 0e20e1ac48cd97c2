"""What ``mat_ds.initialize`` promises beyond the Gram math, on 2 real ranks (tests/test_wrapper.py launches it).

Prints ``WRAPPER_CHECK {json}`` on rank 0 per case:
* ``passthrough``: no "mat" block / ``enabled: false`` -> a plain DeepSpeedEngine, nothing converted, no ``engine.mat``;
* ``unknown``: a model with no attention units and no experts -> one-line ConfigError naming ``make_headwise``;
* ``custom``: a user's own model marked with ``make_headwise`` + ``probe_fn`` trains with MAT;
* ``capture``: no ``probe_batch``: the probe set comes from the first training batches (all ranks, rank order); λmax
  at step 0 when world × micro >= n, else at the first refresh step after the set is full;
* ``checkpoint``: save -> fresh engine -> load restores policies, frozen sets and the probe set; the next steps'
  losses equal the uninterrupted run's.
"""
from __future__ import annotations

import argparse
import json
import tempfile

import deepspeed
import torch
import torch.distributed as dist
import torch.nn.functional as F
import transformers as tf
from torch import nn

import mat_ds
from mat_ds.core.headwise import HeadwiseLinear
from mat_ds.distributed import exit_process

VOCAB, T = 64, 12


def ds_config(mat: dict | None, micro: int = 4) -> dict:
    cfg = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1, "steps_per_print": 10**6,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01, "torch_adam": True}},
           "zero_optimization": {"stage": 2}}
    if mat is not None:
        cfg["mat"] = mat
    return cfg


def bert() -> nn.Module:
    torch.manual_seed(0)
    return tf.BertForMaskedLM(tf.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                            num_attention_heads=4, intermediate_size=64,
                                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def batch(step: int, rank: int, micro: int = 4) -> dict:
    g = torch.Generator().manual_seed(1000 * step + rank)
    ids = torch.randint(5, VOCAB, (micro, T), generator=g)
    labels = torch.where(torch.rand(micro, T, generator=g) < 0.3, ids, torch.full_like(ids, -100))
    labels[:, 0] = ids[:, 0]  # at least one target per sample
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


class TinyLM(nn.Module):
    """A user's own model: plain nn.Linear attention, not a family mat_ds knows."""

    def __init__(self, d: int = 32, heads: int = 4, layers: int = 2):
        super().__init__()
        self.heads = heads
        self.emb = nn.Embedding(VOCAB, d)
        self.blocks = nn.ModuleList(nn.ModuleDict({"q": nn.Linear(d, d), "k": nn.Linear(d, d), "v": nn.Linear(d, d),
                                                   "o": nn.Linear(d, d)}) for _ in range(layers))
        self.head = nn.Linear(d, VOCAB)

    def forward(self, input_ids, labels=None, attention_mask=None):
        x = self.emb(input_ids)
        B, L, d = x.shape
        for b in self.blocks:
            q, k, v = (b[n](x).view(B, L, self.heads, -1).transpose(1, 2) for n in "qkv")
            x = x + b["o"](F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, d))
        return self.head(x)


def tiny_probe_fn(model, batch):
    logits = model(batch["input_ids"])
    tok = F.cross_entropy(logits.transpose(1, 2), batch["labels"].clamp_min(0), reduction="none")
    valid = (batch["labels"] != -100).float()
    return (tok * valid).sum(1) / valid.sum(1).clamp_min(1)


def report(case: str, **values) -> None:
    if dist.get_rank() == 0:
        print("WRAPPER_CHECK " + json.dumps({"case": case, **values}), flush=True)


def passthrough() -> None:
    for mat in (None, {"enabled": False}):
        model = bert()
        engine, *_ = mat_ds.initialize(model=model, model_parameters=model.parameters(), config=ds_config(mat))
        report("passthrough", mat=mat, engine_type=type(engine).__name__, is_ds=isinstance(engine, deepspeed.DeepSpeedEngine),
               has_mat=hasattr(engine, "mat"), headwise=sum(isinstance(m, HeadwiseLinear) for m in model.modules()))


def unknown() -> None:
    model = nn.Sequential(nn.Embedding(VOCAB, 16), nn.Linear(16, VOCAB))
    try:
        mat_ds.initialize(model=model, model_parameters=model.parameters(), config=ds_config({"policy": "mat"}))
        report("unknown", error=None)
    except mat_ds.ConfigError as exc:
        report("unknown", error=str(exc))


def custom() -> None:
    torch.manual_seed(0)
    model = TinyLM()
    for l in range(2):
        mat_ds.make_headwise(model, layer=l, out_proj=[f"blocks.{l}.{n}" for n in "qkv"], in_proj=[f"blocks.{l}.o"],
                             n_units=4)
    cfg = ds_config({"policy": "mat", "alpha": 0.5, "warmup_steps": 2, "refresh_interval": 2, "probe_samples": 8})
    # Its forward takes no labels, so the probe set cannot come from the training calls: pass it.
    engine, *_ = mat_ds.initialize(model=model, model_parameters=model.parameters(), config=cfg,
                                   probe_fn=tiny_probe_fn, probe_batch=batch(99, 0, micro=8))
    losses, lam_keys, active = [], 0, []
    for step in range(6):
        b = batch(step, dist.get_rank())
        logits = engine(b["input_ids"])
        loss = F.cross_entropy(logits.transpose(1, 2), b["labels"])
        engine.backward(loss)
        engine.step()
        m = engine.mat.metrics()
        lam_keys = max(lam_keys, sum(k.startswith("mat/lambda_max/") for k in m))
        active.append(m["mat/active_fraction"])
        losses.append(float(loss))
    report("custom", units=len(engine.mat.units.heads), lam_keys=lam_keys, active=active, losses=losses)


def train_steps(engine, steps, start=0) -> tuple[list, list]:
    losses, refreshes = [], []
    for step in range(start, start + steps):
        loss = engine(**batch(step, dist.get_rank())).loss
        engine.backward(loss)
        engine.step()
        m = engine.mat.metrics()
        if any(k.startswith("mat/lambda_max/") for k in m):
            refreshes.append(step)
        all_loss = loss.detach().reshape(1).clone()
        dist.all_reduce(all_loss)
        losses.append(float(all_loss) / dist.get_world_size())
    return losses, refreshes


def capture() -> None:
    mat = {"policy": "mat", "alpha": 0.3, "warmup_steps": 0, "refresh_interval": 2}
    for n in (8, 16):  # 2 ranks x micro 4 = 8 samples per step
        model = bert()
        engine, *_ = mat_ds.initialize(model=model, model_parameters=model.parameters(),
                                       config=ds_config({**mat, "probe_samples": n}))
        _, refreshes = train_steps(engine, 5)
        probe = engine.mat.probe.batch
        # The probe set is the first n samples seen: rank 0's then rank 1's micro-batch of step 0 (then step 1).
        expect = torch.cat([batch(s, r)["input_ids"] for s in range(2) for r in range(2)])[:n]
        report("capture", n=n, refreshes=refreshes, probe_rows=int(probe["input_ids"].shape[0]),
               probe_is_first_batches=bool(torch.equal(probe["input_ids"], expect)))


def checkpoint() -> None:
    mat = {"policy": "mat", "alpha": 0.4, "beta": 0.05, "warmup_steps": 2, "refresh_interval": 2, "probe_samples": 8}
    save_dir = None
    if dist.get_rank() == 0:
        save_dir = tempfile.mkdtemp(prefix="mat_ckpt_")
    box = [save_dir]
    dist.broadcast_object_list(box, src=0)
    save_dir = box[0]
    model = bert()
    engine, *_ = mat_ds.initialize(model=model, model_parameters=model.parameters(), config=ds_config(mat))
    first, _ = train_steps(engine, 5)
    engine.save_checkpoint(save_dir, tag="s5")
    state = engine.mat.state_dict()
    cont, _ = train_steps(engine, 5, start=5)
    frozen_after = engine.mat.frozen_mask("heads").tolist()

    model2 = bert()
    engine2, *_ = mat_ds.initialize(model=model2, model_parameters=model2.parameters(), config=ds_config(mat))
    engine2.load_checkpoint(save_dir, tag="s5")
    restored = engine2.mat.state_dict()
    same_state = json.dumps(restored["policies"], sort_keys=True) == json.dumps(state["policies"], sort_keys=True) \
        and torch.equal(restored["probe"]["batch"]["input_ids"], state["probe"]["batch"]["input_ids"])
    resumed, _ = train_steps(engine2, 5, start=5)
    report("checkpoint", frozen_at_save=state["policies"]["heads"]["frozen"], same_state=same_state,
           max_loss_diff=max(abs(a - b) for a, b in zip(cont, resumed)), frozen_after=frozen_after,
           frozen_after_resumed=engine2.mat.frozen_mask("heads").tolist(), first=first)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int, default=-1)
    parser.add_argument("--cases", default="passthrough,unknown,custom,capture,checkpoint")
    args = parser.parse_args()
    mat_ds.init_distributed()
    for case in args.cases.split(","):
        globals()[case]()
    mat_ds.shutdown_distributed()


if __name__ == "__main__":
    main()
    exit_process(0)  # no interpreter teardown after the work is done: see mat_ds.distributed.exit_process
