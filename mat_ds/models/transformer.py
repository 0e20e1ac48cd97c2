"""BERT-style masked LM and GPT-style causal LM with addressable attention heads.

One pre-LN transformer serves both (``ModelConfig.arch``): BERT attends bidirectionally and is trained with MLM labels
(-100 = not a target), GPT attends causally and predicts the next token (labels = inputs, shifted here).

The modules MAT selects are attention heads. Head h of block l owns two parameters, ``blocks.l.attn.qkv.w{h}``
(its Q, K and V rows) and ``blocks.l.attn.proj.w{h}`` (its columns of the output projection); ``head_modules()`` lists
them in the order ``layer * n_head + head`` that every other part of mat_ds uses for a head's index.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..core.headwise import HeadwiseLinear, init_std_for_residual
from .switch import SwitchMLP


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, causal: bool, layer: int):
        super().__init__()
        self.n_head, self.d_head, self.causal = cfg.n_head, cfg.d_head, causal
        # Per head the QKV parameter is [3·d_head, d_model]: rows (q_h, k_h, v_h).
        self.qkv = HeadwiseLinear(cfg.d_model, 3 * cfg.d_model, cfg.n_head, split="out", layer=layer)
        self.proj = HeadwiseLinear(cfg.d_model, cfg.d_model, cfg.n_head, split="in",
                                   init_std=init_std_for_residual(cfg.n_layer), layer=layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        qkv = self.qkv(x).view(B, T, self.n_head, 3, self.d_head)
        q, k, v = (qkv[:, :, :, i].transpose(1, 2) for i in range(3))  # [B, H, T, d_head]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.d_head))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, causal: bool, layer: int = 0, moe_seed: int = 0):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg, causal, layer)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.switch = SwitchMLP(cfg, layer, moe_seed) if layer in cfg.moe_layers else None
        if self.switch is None:
            self.fc1 = nn.Linear(cfg.d_model, cfg.d_ff)
            self.fc2 = nn.Linear(cfg.d_ff, cfg.d_model)
            nn.init.normal_(self.fc1.weight, std=0.02)
            nn.init.normal_(self.fc2.weight, std=init_std_for_residual(cfg.n_layer))
            nn.init.zeros_(self.fc1.bias)
            nn.init.zeros_(self.fc2.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        if self.switch is not None:
            return self.switch(x)
        return self.fc2(F.gelu(self.fc1(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.mlp(self.ln2(x)))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, max_seq_len: int):
        super().__init__()
        self.cfg, self.vocab_size, self.max_seq_len = cfg, vocab_size, max_seq_len
        self.causal = cfg.arch == "gpt"
        self.tok_emb = nn.Embedding(vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(max_seq_len, cfg.d_model)
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb.weight, std=0.02)
        self.drop = nn.Dropout(cfg.dropout)
        # One draw from the global RNG seeds every expert's own generator (mat_ds/models/switch.py): identical on every rank
        # and for every ep_size. Drawn only for MoE models so dense models keep their initial weights.
        moe_seed = int(torch.randint(2**31 - 1, ())) if cfg.moe_num_experts else 0
        self.blocks = nn.ModuleList(Block(cfg, self.causal, i, moe_seed) for i in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_bias = nn.Parameter(torch.zeros(vocab_size))  # the decoder weight is tied to tok_emb
        # RaPTr: layers set to False here are skipped (identity) in the forward pass. All True outside training steps.
        self.active_layers: list[bool] = [True] * cfg.n_layer
        self.last_lm_loss: torch.Tensor | None = None  # the LM part of the last training loss (without l_aux)

    # -- heads: the modules MAT selects ------------------------------------------------------------------------------
    @property
    def n_heads_total(self) -> int:
        return self.cfg.n_layer * self.cfg.n_head

    def head_modules(self) -> list[list[nn.Parameter]]:
        """Index ``layer * n_head + head`` -> that head's parameters [qkv rows, output-projection columns]."""
        out = []
        for block in self.blocks:
            out.extend([q, o] for q, o in zip(block.attn.qkv.weight_params(), block.attn.proj.weight_params()))
        return out

    def layer_bodies(self) -> list[list[nn.Parameter]]:
        """Per layer, its parameters that are not head parameters (LayerNorms, MLP): frozen when the layer is skipped."""
        head_ids = {id(p) for head in self.head_modules() for p in head}
        return [[p for p in block.parameters() if id(p) not in head_ids] for block in self.blocks]

    # -- experts: MoE modules MAT selects (Switch layers only) ---------------------------------------------------------
    def switch_layers(self) -> list[SwitchMLP]:
        return [b.switch for b in self.blocks if b.switch is not None]

    @property
    def n_experts_total(self) -> int:
        return len(self.switch_layers()) * self.cfg.moe_num_experts

    def aux_loss(self) -> torch.Tensor | None:
        """Σ over Switch layers of the last forward's load-balancing loss (None for a dense model)."""
        losses = [layer.l_aux for layer in self.switch_layers() if layer.l_aux is not None]
        return torch.stack([torch.as_tensor(v).float().reshape(()) for v in losses]).sum() if losses else None

    # -- forward -----------------------------------------------------------------------------------------------------
    def hidden(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Final hidden states after the last LayerNorm, [B, T, d_model]."""
        T = input_ids.shape[1]
        pos = torch.arange(T, device=input_ids.device)
        x = self.drop(self.tok_emb(input_ids) + self.pos_emb(pos))
        for block, active in zip(self.blocks, self.active_layers):
            if active:
                x = block(x)
        return self.ln_f(x)

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.linear(self.hidden(input_ids), self.tok_emb.weight, self.lm_bias)

    def token_targets(self, labels: torch.Tensor) -> torch.Tensor:
        """Targets aligned with logits positions: shifted for GPT (position t predicts t+1), as given for BERT."""
        if not self.causal:
            return labels
        return torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, per_sample: bool = False) -> torch.Tensor:
        """Mean cross-entropy over target tokens; ``per_sample=True`` gives each sequence's own mean, shape [B].

        The vocabulary projection runs only at target positions ("sparse prediction"): with MLM that is ~15% of the
        tokens, and the d×V projection plus log-softmax is otherwise the largest single cost of a small BERT.
        """
        targets = self.token_targets(labels)
        selected = targets != -100
        h = self.hidden(input_ids)[selected]  # [N_targets, d]
        logits = F.linear(h, self.tok_emb.weight, self.lm_bias)
        tok = F.cross_entropy(logits.float(), targets[selected], reduction="none")
        if not per_sample:
            loss = tok.mean()
            self.last_lm_loss = loss.detach()
            aux = self.aux_loss() if self.training else None
            if aux is not None and self.cfg.moe_aux_loss_coef:
                # Switch: the balancing term is part of the training objective (not of eval or the mNTK probe).
                loss = loss + self.cfg.moe_aux_loss_coef * aux
            return loss
        rows = selected.nonzero()[:, 0]
        sums = torch.zeros(labels.shape[0], dtype=tok.dtype, device=tok.device).index_add(0, rows, tok)
        return sums / selected.sum(1).clamp_min(1).to(tok.dtype)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """nanoGPT's rule: matrices (incl. embeddings and every head) decay; biases and LayerNorm gains do not."""
        decay = [p for p in self.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.dim() < 2]
        return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
                {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]  # names: DeepSpeed's MoE split needs them
