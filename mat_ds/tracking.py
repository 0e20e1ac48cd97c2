"""Run tracking: Weights & Biases plus a local ``metrics.jsonl``, on rank 0 only.

Keys are namespaced: ``train/`` (loss, lr, tokens), ``val/`` and ``test/`` (loss, perplexity), ``perf/`` (step time,
tokens/s, cumulative FLOPs, gradient-communication bytes), ``mat/`` (active fraction, refresh overhead, per-head
λmax). The x-axis is the optimizer step (``trainer/step``), the same in W&B and in the JSONL file, which is what tests
and benchmarks read (W&B runs offline by default here; ``wandb sync OUT_DIR/wandb/offline-run-*`` uploads later).

We do not use DeepSpeed's ``"wandb"`` monitor block: it cannot set a run name or mode, logs against
``global_samples`` and never calls ``wandb.finish()``.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch


class Tracker:
    def __init__(self, out_dir: str, run_name: str, project: str, mode: str, config: dict, enabled: bool,
                 resume_step: Optional[int] = None):
        """``resume_step``: the step a resumed run continues from (None for a fresh run)."""
        self.enabled = enabled
        self.wandb = None
        self.metrics_path = os.path.join(out_dir, "metrics.jsonl")
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        mode = os.environ.get("WANDB_MODE", mode)
        if mode != "disabled":
            import wandb  # imported lazily: non-zero ranks never touch it

            self.wandb = wandb.init(project=project, name=run_name, dir=out_dir, mode=mode, config=config,
                                    id=_stable_run_id(out_dir, run_name),
                                    resume="allow" if resume_step is not None else None)
            self.wandb.define_metric("trainer/step")
            self.wandb.define_metric("*", step_metric="trainer/step")
        if os.path.exists(self.metrics_path):
            # Never delete history: the previous file is kept aside. A resumed run keeps the rows up to its checkpoint
            # (rows logged after it belong to the interrupted trajectory and would be logged again).
            backup = self.metrics_path + (".before-resume" if resume_step is not None else ".old")
            os.replace(self.metrics_path, backup)
            if resume_step is not None:
                keep = [r for r in read_metrics(backup) if r.get("trainer/step", 0) <= resume_step]
                with open(self.metrics_path, "w", encoding="utf-8") as fh:
                    fh.writelines(json.dumps(r) + "\n" for r in keep)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"trainer/step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.metrics_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log(row)

    def log_heads(self, step: int, lam: torch.Tensor, frozen: torch.Tensor, kind: str = "heads") -> None:
        """Per-unit λmax as a W&B table and a layer × unit heatmap (Figure 3 of the paper, one column per refresh):
        ``mat/lambda_table``/``mat/lambda_heatmap`` for heads, ``mat/mlp_lambda_*`` for MLP units."""
        if not self.enabled or self.wandb is None:
            return
        import wandb

        L, H = lam.shape
        unit = "head" if kind == "heads" else "group"
        prefix = "mat/lambda_" if kind == "heads" else "mat/mlp_lambda_"
        table = wandb.Table(columns=["step", "layer", unit, "lambda_max", "frozen"],
                            data=[[step, l, h, float(lam[l, h]), bool(frozen[l, h])] for l in range(L) for h in range(H)])
        self.wandb.log({"trainer/step": step, prefix + "table": table,
                        prefix + "heatmap": wandb.Image(_heatmap(lam, frozen, step, unit))})

    def finish(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _heatmap(lam: torch.Tensor, frozen: torch.Tensor, step: int, unit: str = "head"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1 + 0.5 * lam.shape[1], 1 + 0.4 * lam.shape[0]))
    im = ax.imshow(lam.numpy(), cmap="viridis", aspect="auto")
    for l, h in frozen.nonzero().tolist():
        ax.text(h, l, "×", ha="center", va="center", color="white")
    ax.set_xlabel(unit)
    ax.set_ylabel("layer")
    ax.set_title(f"λmax at step {step} (× = frozen)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return fig


def _plain(v):
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    return v


def _stable_run_id(out_dir: str, run_name: str) -> str:
    """Same out_dir -> same W&B run id, so a resumed job continues its run instead of starting a new one."""
    import hashlib

    return hashlib.sha1(os.path.abspath(out_dir).encode()).hexdigest()[:8] + "-" + "".join(
        c if c.isalnum() else "-" for c in run_name)[:40]


def read_metrics(path: str) -> list[dict]:
    """Rows of a metrics.jsonl file (for tests, benchmarks and plots)."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
