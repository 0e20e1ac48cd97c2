"""Text -> tokenizer -> packed token blocks -> deterministic (micro-)batches.

The package is split by concept; every public name is re-exported here, so ``from mat_ds.data import X`` works:

- ``sources.py``: ``load_texts`` (the embedded corpus ``'default'``, local files/directories/globs, ``hf:NAME[:CONFIG
  [:SPLIT]]``), validation of local files (missing/empty/non-UTF-8 -> one-line ``DataError``), ``text_digest``.
- ``tokenizer.py``: the SentencePiece ``Tokenizer``, ``build_tokenizer`` (BPE training) and its cache.
- ``cache.py``: cache keys, atomic cache writes and the main-rank-first / barrier helpers.
- ``packing.py``: packing text into fixed-length blocks, the block caches, ``DataBundle`` and ``prepare_data``.
- ``batches.py``: deterministic stream positions and permutations, MLM masking, ``make_batch``, evaluation batches.

The embedded corpus is package data in ``mat_ds/corpus/`` (``DEFAULT_CORPUS``).
"""
from .batches import IGNORE_INDEX, block_indices, eval_batch_count, global_positions, iter_eval_batches, make_batch
from .packing import DataBundle, prepare_data
from .sources import DEFAULT_CORPUS, DataError, load_texts, text_digest
from .tokenizer import Tokenizer, build_tokenizer, tokenizer_cache_path

__all__ = [
    "DEFAULT_CORPUS",
    "IGNORE_INDEX",
    "DataBundle",
    "DataError",
    "Tokenizer",
    "block_indices",
    "build_tokenizer",
    "eval_batch_count",
    "global_positions",
    "iter_eval_batches",
    "load_texts",
    "make_batch",
    "prepare_data",
    "text_digest",
    "tokenizer_cache_path",
]
