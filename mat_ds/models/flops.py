"""Analytic FLOPs of a training step, including what frozen heads save.

Counting convention (Megatron/PaLM style, matmuls only; LayerNorm, softmax, GELU and the optimizer are ignored):

* a weight matmul with fan-in a and fan-out b costs, per token, 2ab forward, 2ab for the input gradient (dX) and 2ab for
  the weight gradient (dW). dW is skipped for frozen parameters — that is the saving MAT buys;
* attention scores QKᵀ and the weighted sum AV cost 4·T·d forward per token and twice that backward (no weights, so no
  saving from freezing). Causal masking is not discounted (the kernels here compute the full T×T product);
* the tied LM head is a d×V matmul at predicted positions only (``predicted_fraction``: the MLM probability for
  BERT, whose logits are computed at masked positions only, 1 for GPT); the embedding lookup is free.

Frozen heads still pay forward and dX: a head's input gradient is needed by the layers below it. The same holds for
MLP units (``"mlp"`` in ``mat.modules``): a frozen group of G skips the dW of its fc1 rows and fc2 columns,
2·d·d_ff/G weights (``mlp_unit_weights``). A skipped layer
(RaPTr) costs nothing: no forward, no backward.

MoE (Switch, top-1): a token goes through ONE expert, so an MoE MLP costs what the dense MLP costs per routed token,
plus the router (d × num_experts). Frozen experts skip their weight gradient for the tokens routed to them
(``frozen_expert_tokens``, counted from the gates' routing before capacity dropping). Capacity padding is not counted.

The mNTK probe is charged too (honest accounting of MAT's overhead): forward + dX over the probe batch, the per-sample
gradient GEMMs (2·T·P per sample and head-wise layer) and the n×n Grams (2·n²·P per layer), P = that layer's weights.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import ModelConfig


@dataclass(frozen=True)
class FlopsModel:
    cfg: ModelConfig
    vocab_size: int
    seq_len: int
    predicted_fraction: float = 1.0  # share of positions that go through the LM head

    @classmethod
    def for_run(cls, cfg: ModelConfig, vocab_size: int, seq_len: int, mlm_probability: float) -> "FlopsModel":
        return cls(cfg, vocab_size, seq_len, mlm_probability if cfg.arch == "bert" else 1.0)

    # -- per-token pieces -------------------------------------------------------------------------------------------
    @property
    def head_weights(self) -> int:
        """Parameters of one attention head: 3·d_head·d (QKV rows) + d·d_head (output columns)."""
        return 4 * self.cfg.d_head * self.cfg.d_model

    @property
    def matmul_weights(self) -> int:
        """Weights that enter a matmul per token (all layers + the LM head weighted by the predicted share)."""
        c = self.cfg
        per_layer = 4 * c.d_model * c.d_model + 2 * c.d_model * c.d_ff
        router = len(c.moe_layers) * c.d_model * c.moe_num_experts
        return c.n_layer * per_layer + router + round(c.d_model * self.vocab_size * self.predicted_fraction)

    @property
    def expert_weights(self) -> int:
        """Parameters of one expert that enter a matmul (fc1 + fc2): the dense MLP's."""
        return 2 * self.cfg.d_model * self.cfg.d_ff

    @property
    def attention_core(self) -> int:
        """Forward FLOPs per token of QKᵀ and AV over all layers."""
        return self.cfg.n_layer * 4 * self.seq_len * self.cfg.d_model

    def forward_per_token(self) -> int:
        return 2 * self.matmul_weights + self.attention_core

    @property
    def layer_weights(self) -> int:
        c = self.cfg
        return 4 * c.d_model * c.d_model + 2 * c.d_model * c.d_ff

    def mlp_unit_weights(self, mlp_groups: int) -> int:
        """Weights of one MLP unit (one of ``mlp_groups`` groups of a dense MLP's hidden channels): fc1 rows + fc2
        columns."""
        return 2 * self.cfg.d_model * self.cfg.d_ff // mlp_groups

    def train_per_token(self, n_frozen_heads: int = 0, n_skipped_layers: int = 0, n_frozen_mlp: int = 0,
                        mlp_groups: int = 1) -> int:
        """Forward + backward per token; ``n_frozen_heads`` heads and ``n_frozen_mlp`` MLP units (of ``mlp_groups``
        per layer; in layers that run) skip their weight gradient, ``n_skipped_layers`` layers are not run at all."""
        weights = self.matmul_weights - n_skipped_layers * self.layer_weights
        core = self.attention_core * (self.cfg.n_layer - n_skipped_layers) // self.cfg.n_layer
        fwd = 2 * weights + core
        bwd_dx = 2 * weights + 2 * core
        frozen = n_frozen_heads * self.head_weights + (n_frozen_mlp * self.mlp_unit_weights(mlp_groups)
                                                       if n_frozen_mlp else 0)
        bwd_dw = 2 * (weights - frozen)
        return fwd + bwd_dx + bwd_dw

    # -- per step ---------------------------------------------------------------------------------------------------
    def train_step(self, tokens: int, n_frozen_heads: int = 0, n_skipped_layers: int = 0,
                   frozen_expert_tokens: int = 0, n_frozen_mlp: int = 0, mlp_groups: int = 1) -> int:
        """FLOPs of one optimizer step over ``tokens`` tokens (all ranks, all micro-batches);
        ``frozen_expert_tokens`` = Σ over MoE layers of the tokens routed to a frozen expert (no dW for them)."""
        return tokens * self.train_per_token(n_frozen_heads, n_skipped_layers, n_frozen_mlp, mlp_groups) \
            - 2 * frozen_expert_tokens * self.expert_weights

    def probe_parts(self, n_samples: int, mlp: bool = False) -> tuple[int, int]:
        """(forward + dX over the probe batch, per-sample gradient GEMMs + n×n Grams) of one mNTK refresh; ``mlp``:
        the dense MLPs are measured too (MAT units of kind "mlp")."""
        c, T = self.cfg, self.seq_len
        tokens = n_samples * T
        fwd_dx = tokens * (self.forward_per_token() + 2 * self.matmul_weights + 2 * self.attention_core)
        unit_weights = c.n_layer * 4 * c.d_model * c.d_model  # the head-wise layers' weights
        if mlp:
            unit_weights += (c.n_layer - len(c.moe_layers)) * 2 * c.d_model * c.d_ff
        gram_work = 2 * tokens * unit_weights + 2 * n_samples * n_samples * unit_weights
        if c.moe_num_experts:  # expert slot kernels (dy dyᵀ)⊙(x xᵀ+1) over ~tokens/E slots per expert, fc1 and fc2
            E = c.moe_num_experts
            gram_work += len(c.moe_layers) * E * 4 * (tokens // E) ** 2 * (c.d_model + c.d_ff)
        return fwd_dx, gram_work

    def probe_total(self, n_samples: int, world_size: int, mlp: bool = False) -> int:
        """FLOPs of one refresh over all ranks: every rank runs the probe forward/dX, the Gram work is split by layer."""
        fwd_dx, gram_work = self.probe_parts(n_samples, mlp)
        return world_size * fwd_dx + gram_work
