"""Packing text into fixed-length token blocks, the block caches, ``DataBundle`` and ``prepare_data``.

Pipeline (``prepare_data``):

1. ``load_texts`` (``sources.py``) reads the training/validation/test text.
2. ``build_tokenizer`` (``tokenizer.py``) trains (or reuses) a SentencePiece BPE model on the training text.
3. Every split is tokenized, each non-blank line is followed by ``</s>``, everything is concatenated and cut into
   blocks of ``seq_len`` tokens (remainder dropped). Blocks are cached as ``.pt`` keyed by (text hash, tokenizer
   fingerprint, seq_len). Without ``val_data`` the last ``ceil(val_fraction * N)`` blocks are the validation set.

Multi-process protocol: only the main rank writes caches (to a temporary name, then ``os.replace``); every rank calls
``barrier()`` the same number of times (three in ``prepare_data``, one in ``build_tokenizer``) whatever the cache
state, and a failure on the main rank is re-raised after its barrier so that the other ranks fail with a ``DataError``
of their own instead of waiting forever (helpers in ``cache.py``).
"""
from __future__ import annotations

import io
import logging
import math
import os
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch

from .cache import _CACHE_VERSION, _atomic_write_bytes, _key, _main_first, _missing_after_barrier
from .sources import DataError, _iter_texts, _one_line, load_texts, text_digest
from .tokenizer import Tokenizer, build_tokenizer

if TYPE_CHECKING:  # pragma: no cover
    import datasets

    from mat_ds.config import DataConfig

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------------
# Packing into blocks
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class DataBundle:
    tokenizer: Tokenizer
    train: torch.Tensor  # LongTensor [N_train, seq_len] packed blocks
    val: torch.Tensor  # LongTensor [N_val, seq_len]
    test: Optional[torch.Tensor]
    stats: dict = field(default_factory=dict)  # token/block counts and cache files, for logging


def _pack(ds: "datasets.Dataset", tokenizer: Tokenizer, seq_len: int) -> tuple[torch.Tensor, int]:
    """Every non-blank line's ids followed by eos, concatenated, cut into [N, seq_len] int32 blocks (tail dropped)."""
    stream = array("i")
    eos = tokenizer.eos_id
    for texts in _iter_texts(ds):
        lines = [t for t in texts if t.strip()]
        for ids in tokenizer.encode(lines):
            stream.extend(ids)
            stream.append(eos)
    n_tokens = len(stream)
    n_blocks = n_tokens // seq_len
    flat = torch.frombuffer(stream, dtype=torch.int32) if n_tokens else torch.zeros(0, dtype=torch.int32)
    return flat[: n_blocks * seq_len].clone().view(n_blocks, seq_len), n_tokens


def _blocks_cache_path(digest: str, tokenizer: Tokenizer, seq_len: int, cache_dir: str) -> Path:
    key = _key({"v": _CACHE_VERSION, "text": digest, "tokenizer": tokenizer.fingerprint, "seq_len": seq_len})
    return Path(cache_dir) / f"blocks-L{seq_len}-{key[:20]}.pt"


def _write_blocks(path: Path, ds: "datasets.Dataset", tokenizer: Tokenizer, seq_len: int) -> None:
    if path.is_file():
        logger.info("token blocks cache hit: %s", path)
        return
    t0 = time.perf_counter()
    blocks, n_tokens = _pack(ds, tokenizer, seq_len)
    buf = io.BytesIO()
    torch.save({"blocks": blocks, "n_tokens": n_tokens, "seq_len": seq_len}, buf)
    _atomic_write_bytes(path, buf.getvalue())
    logger.info("tokenized %d tokens into %d blocks in %.1fs: %s", n_tokens, len(blocks), time.perf_counter() - t0,
                path)


def _read_blocks(path: Path) -> tuple[torch.Tensor, int]:
    if not path.is_file():
        raise _missing_after_barrier("token block cache", path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        return obj["blocks"].long(), int(obj["n_tokens"])
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"cannot read token block cache {path}: {type(exc).__name__}: {_one_line(exc)} "
                        f"(delete it to rebuild)") from None


def prepare_data(cfg: "DataConfig", *, is_main: bool, barrier: Callable[[], None]) -> DataBundle:
    """Load, tokenize and pack the train/val/test text of ``cfg`` (see the module docstring).

    Every rank calls ``barrier()`` exactly three times (after loading text, after the tokenizer, after the block
    caches). Local files go through ``datasets`` with its Arrow cache in ``cfg.cache_dir/datasets`` (hub datasets: the
    default Hugging Face cache).
    Raises ``DataError`` for bad data, a corpus too small for the vocabulary, fewer than 2 training blocks or no
    validation/test block (with the token count and a smaller ``--seq_len`` to try).
    """
    ds_cache = os.path.join(cfg.cache_dir, "datasets")
    specs = {"train": cfg.train_data, "val": cfg.val_data, "test": cfg.test_data}
    specs = {k: v for k, v in specs.items() if v is not None}
    def load_all() -> dict[str, Any]:
        return {k: load_texts(v, cache_dir=None if v.strip().startswith("hf:") else ds_cache) for k, v in specs.items()}

    texts: dict[str, Any] = _main_first(load_all, is_main=is_main, barrier=barrier)
    tokenizer = build_tokenizer(texts["train"], cfg.vocab_size, cfg.cache_dir, is_main=is_main, barrier=barrier)
    paths = {k: _blocks_cache_path(text_digest(ds), tokenizer, cfg.seq_len, cfg.cache_dir) for k, ds in texts.items()}

    def write_all() -> None:
        for k, ds in texts.items():
            _write_blocks(paths[k], ds, tokenizer, cfg.seq_len)

    _main_first(write_all if is_main else (lambda: None), is_main=is_main, barrier=barrier)
    loaded = {k: _read_blocks(p) for k, p in paths.items()}

    L = cfg.seq_len
    full, n_tok = loaded["train"]
    n = len(full)
    if cfg.val_data is None:
        n_val = math.ceil(cfg.val_fraction * n)
        if n - n_val < 2 or n_val < 1:
            raise DataError(f"training text {cfg.train_data} gives {n_tok} tokens = {n} blocks of seq_len={L}; need at "
                            f"least 2 training blocks plus {max(n_val, 1)} held-out validation block(s) "
                            f"(val_fraction={cfg.val_fraction}): use a smaller --seq_len or more text")
        train, val = full[: n - n_val], full[n - n_val:]
    else:
        if n < 2:
            raise DataError(f"training text {cfg.train_data} gives {n_tok} tokens = {n} blocks of seq_len={L}; need at "
                            f"least 2: use a smaller --seq_len or more text")
        train = full
        val, n_val_tok = loaded["val"]
        if len(val) == 0:
            raise DataError(f"validation text {cfg.val_data} gives {n_val_tok} tokens, less than one block of "
                            f"seq_len={L}: use a smaller --seq_len or more text")
    test = None
    if "test" in loaded:
        test, n_test_tok = loaded["test"]
        if len(test) == 0:
            raise DataError(f"test text {cfg.test_data} gives {n_test_tok} tokens, less than one block of "
                            f"seq_len={L}: use a smaller --seq_len or more text")
    stats = {"train_tokens_total": n_tok, "train_blocks": len(train), "val_blocks": len(val),
             "test_blocks": None if test is None else len(test), "seq_len": L, "vocab_size": tokenizer.vocab_size,
             "tokenizer": tokenizer.model_path, "block_caches": {k: str(p) for k, p in paths.items()}}
    return DataBundle(tokenizer=tokenizer, train=train, val=val, test=test, stats=stats)
