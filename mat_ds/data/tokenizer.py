"""The SentencePiece tokenizer of ``mat_ds.data``: the ``Tokenizer`` class, its training and its cache.

``build_tokenizer`` trains a SentencePiece **BPE** model on the training text and caches it under a name keyed by the
text's content hash, the vocabulary size and the trainer settings (``tokenizer_cache_path``). Only the main rank trains
and writes it; every rank calls ``barrier()`` once and then loads it.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

import torch

from .batches import IGNORE_INDEX, _derive_seed
from .cache import _CACHE_VERSION, _atomic_write_bytes, _key, _main_first, _missing_after_barrier
from .sources import DataError, _iter_texts, _one_line, text_digest

if TYPE_CHECKING:  # pragma: no cover
    import datasets

logger = logging.getLogger(__name__)

_UNK_LITERAL = "<unk>"  # WikiText writes rare words as the literal "<unk>": it is encoded as the unk id

# SentencePiece trainer settings (all part of the tokenizer cache key).
# BPE rather than unigram: on the same input it gives the same pieces whatever num_threads is (unigram's EM sums
# depend on the thread split), and it trains faster (~0.1 s on 1 MB).
_SPM_SETTINGS: dict[str, Any] = dict(
    model_type="bpe",
    character_coverage=0.9995,
    normalization_rule_name="nmt_nfkc",
    split_by_unicode_script=True,
    max_sentence_length=16384,
    input_sentence_size=0,  # sentencepiece's own sampling is not reproducible: we sample (see _TRAIN_MAX_LINES)
    pad_id=0,
    unk_id=1,
    eos_id=2,
    bos_id=-1,
    pad_piece="<pad>",
    unk_piece="<unk>",
    eos_piece="</s>",
    control_symbols="<mask>",
)
_SPM_SEED = 1234
_TRAIN_MAX_LINES = 300_000  # larger corpora: the tokenizer sees a seeded random sample of this many non-blank lines
_MASK_PIECE = "<mask>"


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------------------
class Tokenizer:
    """A trained SentencePiece model plus the ids the training loop needs.

    Attributes: ``vocab_size``, ``pad_id``, ``mask_id``, ``eos_id``, ``unk_id`` (distinct, valid ids), ``model_path``,
    ``fingerprint`` (sha256 of the piece table: equal fingerprints encode identically), ``special_ids`` (the four
    special ids) and ``normal_ids`` (LongTensor of every other id: what MLM's "random token" draws from).
    The literal text ``<unk>`` (WikiText's rare-word marker) is encoded as ``unk_id`` and decoded back to ``<unk>``.
    """

    def __init__(self, model_path: str | os.PathLike) -> None:
        import sentencepiece as spm

        self.model_path = str(model_path)
        try:
            self._sp = spm.SentencePieceProcessor(model_file=self.model_path)
        except (OSError, RuntimeError) as exc:
            raise DataError(f"cannot load tokenizer {self.model_path}: {_one_line(exc)} "
                            f"(delete it to retrain)") from None
        sp = self._sp
        self.vocab_size: int = sp.get_piece_size()
        self.pad_id: int = sp.pad_id()
        self.eos_id: int = sp.eos_id()
        self.unk_id: int = sp.unk_id()
        self.mask_id: int = sp.piece_to_id(_MASK_PIECE)
        ids = (self.pad_id, self.mask_id, self.eos_id, self.unk_id)
        if len(set(ids)) != 4 or not all(0 <= i < self.vocab_size for i in ids):
            raise DataError(f"tokenizer {self.model_path} lacks distinct <pad>, <mask>, </s>, <unk> pieces "
                            f"(ids {ids}); delete it to retrain")
        self.special_ids: frozenset[int] = frozenset(ids)
        table = [(sp.id_to_piece(i), sp.get_score(i), sp.is_control(i), sp.is_unknown(i), sp.is_unused(i))
                 for i in range(self.vocab_size)]
        self.fingerprint: str = hashlib.sha256(json.dumps(table).encode()).hexdigest()
        self.normal_ids = torch.tensor([i for i, t in enumerate(table) if not (t[2] or t[3] or t[4])], dtype=torch.long)

    def __repr__(self) -> str:
        return (f"Tokenizer({self.model_path!r}, vocab_size={self.vocab_size}, pad={self.pad_id}, mask={self.mask_id}, "
                f"eos={self.eos_id}, unk={self.unk_id})")

    def __getstate__(self) -> dict:
        return {"model_path": self.model_path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["model_path"])  # type: ignore[misc]

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text (no eos added). A single ``str`` gives a single list."""
        if isinstance(texts, str):
            return self.encode([texts])[0]
        parts: list[str] = []
        counts: list[int] = []
        for t in texts:
            pieces = t.split(_UNK_LITERAL)
            parts.extend(pieces)
            counts.append(len(pieces))
        encoded = self._sp.encode(parts) if parts else []
        out: list[list[int]] = []
        i = 0
        for n in counts:
            ids = list(encoded[i])
            for j in range(1, n):
                ids.append(self.unk_id)
                ids.extend(encoded[i + j])
            out.append(ids)
            i += n
        return out

    def decode(self, ids: Iterable[int] | torch.Tensor) -> str:
        """Text of ``ids`` (control ids such as pad/eos/mask decode to nothing; unk to ``<unk>``)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        segments: list[list[int]] = [[]]
        for i in ids:
            i = int(i)
            if i == self.unk_id:
                segments.append([])
            elif i != IGNORE_INDEX:
                segments[-1].append(i)
        texts = [self._sp.decode(s) for s in segments]
        return f" {_UNK_LITERAL} ".join(texts).strip()


def _training_sentences(ds: "datasets.Dataset", max_lines: int = _TRAIN_MAX_LINES) -> Iterator[str]:
    """Non-blank lines without the literal ``<unk>``; beyond ``max_lines`` lines, a seeded sample (same every time)."""
    def lines() -> Iterator[str]:
        for texts in _iter_texts(ds):
            for t in texts:
                t = t.replace(_UNK_LITERAL, " ").strip()
                if t:
                    yield t

    keep = None
    if ds.num_rows > max_lines:
        n = sum(1 for _ in lines())
        if n > max_lines:
            g = torch.Generator().manual_seed(_derive_seed(_SPM_SEED, n))
            keep = torch.zeros(n, dtype=torch.bool)
            keep[torch.randperm(n, generator=g)[:max_lines]] = True
    for i, t in enumerate(lines()):
        if keep is None or keep[i]:
            yield t


def _train_spm(ds: "datasets.Dataset", vocab_size: int) -> bytes:
    import sentencepiece as spm

    spm.set_random_generator_seed(_SPM_SEED)
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=_training_sentences(ds), model_writer=buf,
                                       vocab_size=vocab_size, num_threads=max(1, min(4, os.cpu_count() or 1)),
                                       minloglevel=2, **_SPM_SETTINGS)
    except RuntimeError as exc:
        msg = _one_line(exc)
        m = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", msg)
        if m:
            raise DataError(f"the training text is too small for vocab_size={vocab_size}: it supports at most "
                            f"{m.group(2)} pieces; pass a smaller --vocab_size (<= {m.group(2)}) "
                            f"or more text") from None
        m = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", msg)
        if m:
            raise DataError(f"vocab_size={vocab_size} is smaller than the {m.group(2)} characters the training text "
                            f"needs (plus special pieces); pass a larger --vocab_size") from None
        raise DataError(f"sentencepiece could not train a tokenizer with vocab_size={vocab_size}: {msg}") from None
    return buf.getvalue()


def tokenizer_cache_path(train_texts: "datasets.Dataset", vocab_size: int, cache_dir: str) -> Path:
    """Where ``build_tokenizer`` keeps the model for this text and vocabulary size."""
    key = _key({"v": _CACHE_VERSION, "text": text_digest(train_texts), "vocab_size": vocab_size,
                "spm": _SPM_SETTINGS, "seed": _SPM_SEED, "max_lines": _TRAIN_MAX_LINES, "unk_literal": _UNK_LITERAL})
    return Path(cache_dir) / f"spm-bpe{vocab_size}-{key[:20]}.model"


def build_tokenizer(train_texts: "datasets.Dataset", vocab_size: int, cache_dir: str, *, is_main: bool,
                    barrier: Callable[[], None]) -> Tokenizer:
    """Train (or reuse) a SentencePiece **BPE** tokenizer of exactly ``vocab_size`` pieces on ``train_texts``.

    Ids: ``<pad>`` 0, ``<unk>`` 1, ``</s>`` 2 (eos), ``<mask>`` 3 (a control symbol: never produced from text); no bos.
    Trainer: character_coverage 0.9995, NFKC normalisation, lines of up to 16 KiB, literal ``<unk>`` removed from
    the training text (it encodes to ``unk_id``); a corpus of more than 300k non-blank lines is subsampled to 300k
    lines with a seeded torch permutation (sentencepiece's own sampling is not reproducible). BPE gives the same
    pieces for the same input whatever the thread count, so the same text gives the same model.

    The model is cached as ``cache_dir/spm-bpe{V}-{key}.model``, key = hash(text content, vocab_size, settings). Only
    the main rank trains and writes it (temp name + ``os.replace``); every rank calls ``barrier()`` exactly once and
    then loads it. A corpus too small for ``vocab_size`` is a ``DataError`` naming the largest size that works.
    """
    path = tokenizer_cache_path(train_texts, vocab_size, cache_dir)

    def build() -> None:
        if path.is_file():
            logger.info("tokenizer cache hit: %s", path)
            return
        t0 = time.perf_counter()
        model = _train_spm(train_texts, vocab_size)
        _atomic_write_bytes(path, model)
        logger.info("trained tokenizer (bpe, vocab %d) in %.1fs: %s", vocab_size, time.perf_counter() - t0, path)

    _main_first(build if is_main else (lambda: None), is_main=is_main, barrier=barrier)
    if not path.is_file():
        raise _missing_after_barrier("tokenizer", path)
    return Tokenizer(path)
