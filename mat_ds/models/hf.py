"""A Hugging Face model for the project's trainer: ``--model hf:PATH``.

PATH is a model directory (``config.json``, and weights if any) or a ``config.json`` file, on local disk — never the
hub. Without weights the model is built from the config with random initialisation; with weights
(``model.safetensors``, ``pytorch_model.bin`` or a sharded index) they are loaded. The trainer tokenizes with its own
SentencePiece tokenizer, so the model's token embeddings are sized to that vocabulary (``resize_token_embeddings``
when pretrained weights have another size: the rest of the network keeps its weights) and position embeddings must
cover ``--seq_len``.

Objective from the config: ``*ForMaskedLM`` architectures and encoder families (BERT, RoBERTa, ...) train masked LM;
everything else causal LM (HF conventions: labels = input_ids, the model shifts; -100 = ignored).

The trainer's FLOPs accounting uses the dense-transformer estimate from the config (layers, hidden, heads, MLP width);
grouped KV heads and gated MLPs are not modelled exactly.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..config import ConfigError, ModelConfig

MASKED_TYPES = {"bert", "roberta", "xlm-roberta", "electra", "distilbert", "camembert", "deberta", "deberta-v2"}
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")


def hf_directory(spec: str) -> Path:
    """``hf:PATH`` -> the model directory; one-line ``ConfigError`` when there is no config.json."""
    path = Path(spec[len("hf:"):]).expanduser()
    directory = path.parent if path.name == "config.json" else path
    if not (directory / "config.json").is_file():
        raise ConfigError(f"--model {spec}: no config.json at {directory} (give a local HF model directory or its "
                          f"config.json; mat_ds never downloads)")
    return directory


def load_hf_model(spec: str, vocab_size: int, seq_len: int) -> tuple[nn.Module, str]:
    """(model, objective 'mlm' | 'clm') for ``--model hf:PATH``; see the module docstring."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    directory = hf_directory(spec)
    try:
        config = AutoConfig.from_pretrained(directory)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"--model {spec}: cannot read config.json: {' '.join(str(exc).split())[:200]}") from None
    archs = getattr(config, "architectures", None) or []
    masked = any(a.endswith("ForMaskedLM") for a in archs) or (not archs and config.model_type in MASKED_TYPES)
    auto = AutoModelForMaskedLM if masked else AutoModelForCausalLM
    positions = getattr(config, "max_position_embeddings", getattr(config, "n_positions", None))
    if positions is not None and positions < seq_len:
        raise ConfigError(f"--model {spec}: the model has {positions} positions, fewer than --seq_len {seq_len}")
    try:
        if any((directory / f).exists() for f in WEIGHT_FILES):
            model = auto.from_pretrained(directory)
            if model.get_input_embeddings().num_embeddings != vocab_size:
                model.resize_token_embeddings(vocab_size)
        else:
            config.vocab_size = vocab_size
            for key in ("pad_token_id", "bos_token_id", "eos_token_id"):  # ids of the hub tokenizer, not ours
                if getattr(config, key, None) is not None and getattr(config, key) >= vocab_size:
                    setattr(config, key, None)
            model = auto.from_config(config)
    except ValueError as exc:  # e.g. a config whose model type has no masked/causal LM head
        raise ConfigError(f"--model {spec}: {' '.join(str(exc).split())[:200]}") from None
    return model.float(), "mlm" if masked else "clm"


def flops_config(model: nn.Module) -> ModelConfig:
    """The dense-transformer shape of an HF model, for the trainer's analytic FLOPs (see the module docstring)."""
    c = model.config
    d = getattr(c, "hidden_size", getattr(c, "n_embd", None))
    heads = getattr(c, "num_attention_heads", getattr(c, "n_head", None))
    layers = getattr(c, "num_hidden_layers", getattr(c, "n_layer", None))
    d_ff = getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * d
    arch = "bert" if c.model_type in MASKED_TYPES else "gpt"
    return ModelConfig(arch=arch, n_layer=int(layers), n_head=int(heads), d_model=int(d), d_ff=int(d_ff), dropout=0.0)


def targets_of(labels: torch.Tensor, objective: str) -> torch.Tensor:
    """Labels aligned with prediction positions (causal LMs predict t+1), for counting target tokens."""
    if objective == "clm":
        return labels[:, 1:]
    return labels
