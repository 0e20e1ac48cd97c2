"""Text -> tokenizer -> packed token blocks -> deterministic (micro-)batches.

Pipeline (``prepare_data``):

1. ``load_texts`` reads the training/validation/test text: the embedded corpus (``'default'``), local text files
   (a file, a directory of ``*.txt``, a glob; ``.gz`` is read directly) or a Hugging Face hub dataset
   (``'hf:NAME[:CONFIG[:SPLIT]]'``). Local files are checked first (exists, not blank, strict UTF-8) so that a bad
   file is a one-line ``DataError`` naming the path instead of a deep traceback.
2. ``build_tokenizer`` trains a SentencePiece **BPE** model on the training text and caches it under a name keyed by
   the text's content hash, the vocabulary size and the trainer settings.
3. Every split is tokenized, each non-blank line is followed by ``</s>``, everything is concatenated and cut into
   blocks of ``seq_len`` tokens (remainder dropped). Blocks are cached as ``.pt`` keyed by (text hash, tokenizer
   fingerprint, seq_len). Without ``val_data`` the last ``ceil(val_fraction * N)`` blocks are the validation set.

Multi-process protocol: only the main rank writes caches (to a temporary name, then ``os.replace``); every rank calls
``barrier()`` the same number of times (three in ``prepare_data``, one in ``build_tokenizer``) whatever the cache
state, and a failure on the main rank is re-raised after its barrier so that the other ranks fail with a ``DataError``
of their own instead of waiting forever.

Batches are a pure function of (seed, stream position): ``global_positions`` lays the infinite training stream out over
(step, micro_step, rank) so that 1 rank x grad_accum 2 sees exactly the samples of 2 ranks x grad_accum 1;
``block_indices`` maps positions to blocks with one seeded permutation per epoch; ``make_batch`` builds CLM or MLM
batches whose MLM mask depends only on (seed, position). Resuming at a step therefore replays the same data.
"""
from __future__ import annotations

import codecs
import contextlib
import functools
import glob as _glob
import gzip
import hashlib
import io
import json
import logging
import math
import os
import re
import time
import uuid
import zlib
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Optional, Sequence

import torch

if TYPE_CHECKING:  # pragma: no cover
    import datasets

    from mat_ds.config import DataConfig

logger = logging.getLogger(__name__)

DEFAULT_CORPUS: Path = Path(__file__).resolve().parent / "corpus" / "wikitext2_valid.txt.gz"

# Bump when the tokenizer training recipe or the packing format changes: invalidates old cache entries.
_CACHE_VERSION = 1
_UNK_LITERAL = "<unk>"  # WikiText writes rare words as the literal "<unk>": it is encoded as the unk id
_GLOB_CHARS = re.compile(r"[*?\[]")

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

# Salts that keep the random streams of permutation and masking independent.
_PERM_SALT = 0x5045524D  # "PERM"
_MASK_SALT = 0x4D41534B  # "MASK"

IGNORE_INDEX = -100


class DataError(ValueError):
    """A user-facing data problem. The message is one line and says what is wrong and with which path."""


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())


# ----------------------------------------------------------------------------------------------------------------------
# Loading text
# ----------------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No progress bars or info logs from ``datasets`` (every rank would print them); restores the previous state."""
    import datasets

    bars = datasets.is_progress_bar_enabled()
    verbosity = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()


def _resolve_local(spec: str) -> list[Path]:
    """A file, a directory (its ``*.txt`` and ``*.txt.gz``, sorted, not recursive) or a glob -> sorted list of files."""
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith((".txt", ".txt.gz")))
        if not files:
            raise DataError(f"data directory {path} contains no *.txt files")
        return files
    if path.exists():
        raise DataError(f"data path {path} is not a regular file or directory")
    if _GLOB_CHARS.search(spec):
        files = sorted(Path(p) for p in _glob.glob(os.path.expanduser(spec), recursive=True) if os.path.isfile(p))
        if not files:
            raise DataError(f"no files match the data pattern {spec}")
        return files
    raise DataError(f"data path {path} does not exist")


def _check_text_file(path: Path, chunk_size: int = 1 << 20) -> None:
    """Raise DataError unless ``path`` is non-empty, strictly valid UTF-8 and not only whitespace (.gz: its content)."""
    try:
        if path.stat().st_size == 0:
            raise DataError(f"data file {path} is empty")
        opener = gzip.open if path.name.endswith(".gz") else open
        decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
        offset = 0  # bytes handed to the decoder so far
        has_text = False
        with opener(path, "rb") as fh:  # type: ignore[operator]
            while True:
                chunk = fh.read(chunk_size)
                final = not chunk
                pending = len(decoder.getstate()[0])
                try:
                    text = decoder.decode(chunk, final=final)
                except UnicodeDecodeError as exc:
                    # exc.object is the decoder's pending bytes + this chunk
                    where = offset - pending + exc.start
                    bad = exc.object[exc.start:exc.start + 1].hex()
                    what = "uncompressed byte offset" if opener is gzip.open else "byte offset"
                    raise DataError(f"data file {path} is not valid UTF-8: {exc.reason} (byte 0x{bad}) at {what} "
                                    f"{where}") from None
                if not has_text and text.strip():
                    has_text = True
                offset += len(chunk)
                if final:
                    break
    except DataError:
        raise
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DataError(f"data file {path} is not a valid gzip file: {_one_line(exc)}") from None
    except OSError as exc:
        raise DataError(f"cannot read data file {path}: {_one_line(exc.strerror or exc)}") from None
    if offset == 0:
        raise DataError(f"data file {path} is empty")
    if not has_text:
        raise DataError(f"data file {path} contains only whitespace")


def _load_hub(spec: str, cache_dir: Optional[str]) -> "datasets.Dataset":
    import datasets

    parts = spec[len("hf:"):].split(":")
    if len(parts) > 3 or not parts[0].strip():
        raise DataError(f"bad hub data spec {spec!r}: expected hf:NAME[:CONFIG[:SPLIT]]")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    try:
        with _quiet_datasets():
            ds = datasets.load_dataset(name, config, split=split, cache_dir=cache_dir)
    except Exception as exc:  # noqa: BLE001 - any failure of the hub is the user's data problem
        raise DataError(f"cannot load hub dataset {spec!r} (name={name}, config={config}, split={split}): "
                        f"{type(exc).__name__}: {_one_line(exc)}") from None
    if not isinstance(ds, datasets.Dataset):
        raise DataError(f"hub dataset {spec!r} did not load as a single split (got {type(ds).__name__})")
    if "text" not in ds.column_names:
        raise DataError(f"hub dataset {spec!r} has no 'text' column (columns: {', '.join(ds.column_names)})")
    feature = ds.features["text"]
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise DataError(f"hub dataset {spec!r}: column 'text' holds {feature}, not strings")
    if ds.num_rows == 0:
        raise DataError(f"hub dataset {spec!r} has no rows")
    return ds.select_columns(["text"])


def load_texts(spec: str, *, cache_dir: Optional[str] = None) -> "datasets.Dataset":
    """Load text as a ``datasets.Dataset`` with one column, ``'text'`` (one row per line for local files).

    ``spec``: ``'default'`` (``DEFAULT_CORPUS``); a local file, a directory (its ``*.txt`` and ``*.txt.gz`` files,
    sorted by name, not recursive) or a glob (sorted matches, ``**`` allowed); or ``'hf:NAME[:CONFIG[:SPLIT]]'`` ->
    ``datasets.load_dataset(NAME, CONFIG, split=SPLIT or 'train')`` (needs internet unless cached; NAME may also be a
    local dataset directory). Local files are checked first (non-empty, not whitespace-only, strict UTF-8 with the byte
    offset of the first bad byte) and then read with the ``'text'`` builder (``keep_linebreaks=False``; ``.gz`` is
    decompressed by ``datasets``). ``cache_dir``: where ``datasets`` keeps its Arrow copy (default: its own cache,
    ``~/.cache/huggingface/datasets``); ``prepare_data`` passes ``cfg.cache_dir/datasets`` for local files only, so
    hub downloads stay in the shared Hugging Face cache.

    Raises ``DataError`` (one line, with the path) for every problem with the data.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"data spec {spec!r} is empty")
    spec = spec.strip()
    if spec.startswith("hf:"):
        return _load_hub(spec, cache_dir)
    files = [DEFAULT_CORPUS] if spec == "default" else _resolve_local(spec)
    if spec == "default" and not DEFAULT_CORPUS.is_file():
        raise DataError(f"the embedded corpus {DEFAULT_CORPUS} is missing: reinstall mat_ds (package data)")
    for path in files:
        _check_text_file(path)
    import datasets

    try:
        with _quiet_datasets():
            ds = datasets.load_dataset("text", data_files=[str(p.resolve()) for p in files], split="train",
                                       keep_linebreaks=False, cache_dir=cache_dir)
    except Exception as exc:  # noqa: BLE001
        shown = files[0] if len(files) == 1 else f"{files[0]} (+{len(files) - 1} more)"
        raise DataError(f"cannot read data file {shown}: {type(exc).__name__}: {_one_line(exc)}") from None
    return ds


# ----------------------------------------------------------------------------------------------------------------------
# Hashing and cache files
# ----------------------------------------------------------------------------------------------------------------------
def _iter_texts(ds: "datasets.Dataset", batch_size: int = 8192) -> Iterator[list[str]]:
    for batch in ds.iter(batch_size=batch_size):
        yield [t if isinstance(t, str) else "" for t in batch["text"]]


_DIGEST_MEMO: dict[str, str] = {}


def text_digest(ds: "datasets.Dataset") -> str:
    """sha256 (hex) of the text content of ``ds`` (lines with their boundaries), memoised per dataset fingerprint."""
    key = getattr(ds, "_fingerprint", None)
    if key is not None and key in _DIGEST_MEMO:
        return _DIGEST_MEMO[key]
    h = hashlib.sha256()
    n = 0
    for texts in _iter_texts(ds):
        for t in texts:
            b = t.encode("utf-8", "surrogatepass")
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
            n += 1
    h.update(n.to_bytes(8, "little"))
    digest = h.hexdigest()
    if key is not None:
        _DIGEST_MEMO[key] = digest
    return digest


def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _main_first(fn: Callable[[], Any], *, is_main: bool, barrier: Callable[[], None]) -> Any:
    """Main rank runs ``fn`` before the barrier, the others after it; a failure on main is raised after its barrier."""
    if is_main:
        error: Optional[BaseException] = None
        result = None
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the other ranks were released
            error = exc
        barrier()
        if error is not None:
            raise error
        return result
    barrier()
    return fn()


def _missing_after_barrier(what: str, path: Path) -> DataError:
    return DataError(f"{what} {path} is missing after the main rank's barrier: the main rank failed (see its error), "
                     f"or cache_dir is not shared by all ranks (pass is_main for the first rank of each node)")


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


# ----------------------------------------------------------------------------------------------------------------------
# Deterministic ordering and batches
# ----------------------------------------------------------------------------------------------------------------------
def _derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (hash-mixed, so nearby inputs give unrelated streams)."""
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(int(p).to_bytes(16, "little", signed=True))
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def global_positions(step: int, micro_step: int, rank: int, world_size: int, micro_batch: int,
                     grad_accum: int) -> torch.Tensor:
    """Stream positions of one micro-batch: ``base = step*GB + (micro_step*world_size + rank)*micro_batch``, with
    ``GB = micro_batch*world_size*grad_accum``; returns ``arange(base, base + micro_batch)``. One optimizer step covers
    ``[step*GB, (step+1)*GB)`` whatever the split between ranks and accumulation steps."""
    if not (world_size >= 1 and 0 <= rank < world_size):
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    if not (grad_accum >= 1 and 0 <= micro_step < grad_accum):
        raise ValueError(f"micro_step={micro_step} must be in [0, grad_accum={grad_accum})")
    if micro_batch < 1 or step < 0:
        raise ValueError(f"micro_batch={micro_batch} must be >= 1 and step={step} >= 0")
    global_batch = micro_batch * world_size * grad_accum
    base = step * global_batch + (micro_step * world_size + rank) * micro_batch
    return torch.arange(base, base + micro_batch, dtype=torch.long)


@functools.lru_cache(maxsize=8)  # a few (n_blocks, seed, epoch): bounded memory for big corpora
def _epoch_permutation(n_blocks: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(_derive_seed(_PERM_SALT, seed, epoch))
    return torch.randperm(n_blocks, generator=g)


def block_indices(positions: torch.Tensor, n_blocks: int, seed: int) -> torch.Tensor:
    """Block index of each stream position: ``perm(seed, epoch)[pos % n_blocks]`` with ``epoch = pos // n_blocks`` and
    one seeded ``torch.randperm`` per epoch (cached). Same result on every rank and after a resume."""
    if n_blocks < 1:
        raise ValueError(f"n_blocks={n_blocks} must be >= 1")
    pos = torch.as_tensor(positions, dtype=torch.long)
    if pos.numel() and int(pos.min()) < 0:
        raise ValueError("stream positions must be >= 0")
    epochs = pos // n_blocks
    offsets = pos % n_blocks
    out = torch.empty_like(pos)
    for epoch in torch.unique(epochs).tolist():
        sel = epochs == epoch
        out[sel] = _epoch_permutation(n_blocks, seed, int(epoch))[offsets[sel]]
    return out


def _mlm_mask(x: torch.Tensor, positions: torch.Tensor, tokenizer: Tokenizer, mlm_probability: float,
              seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking of ``x`` [B, L]; the random draws of row i come from a generator seeded by (seed, positions[i])."""
    B, L = x.shape
    u_sel = torch.empty(B, L)
    u_act = torch.empty(B, L)
    r_tok = torch.empty(B, L, dtype=torch.long)
    n_normal = len(tokenizer.normal_ids)
    for i, pos in enumerate(positions.tolist()):
        g = torch.Generator().manual_seed(_derive_seed(_MASK_SALT, seed, pos))
        u_sel[i] = torch.rand(L, generator=g)
        u_act[i] = torch.rand(L, generator=g)
        r_tok[i] = torch.randint(n_normal, (L,), generator=g)
    eligible = x != tokenizer.pad_id
    selected = (u_sel < mlm_probability) & eligible
    # at least one selected position per sample (unless it is all padding): the eligible one with the smallest draw
    empty = ~selected.any(dim=1) & eligible.any(dim=1)
    if empty.any():
        first = torch.where(eligible, u_sel, torch.full_like(u_sel, 2.0)).argmin(dim=1)
        rows = empty.nonzero().squeeze(1)
        selected[rows, first[rows]] = True
    labels = torch.where(selected, x, torch.full_like(x, IGNORE_INDEX))
    inputs = x.clone()
    to_mask = selected & (u_act < 0.8)
    to_rand = selected & (u_act >= 0.8) & (u_act < 0.9)
    inputs[to_mask] = tokenizer.mask_id
    inputs[to_rand] = tokenizer.normal_ids[r_tok[to_rand]]
    return inputs, labels


def make_batch(blocks: torch.Tensor, positions: torch.Tensor, *, objective: str, tokenizer: Tokenizer,
               mlm_probability: float, seed: int, n_blocks_for_order: Optional[int] = None,
               shuffle: bool = True) -> dict[str, torch.Tensor]:
    """The micro-batch for stream ``positions``: ``{'input_ids', 'labels'}``, LongTensors [len(positions), seq_len].

    Rows: ``shuffle=True`` -> ``block_indices(positions, n_blocks_for_order or len(blocks), seed)`` (an order computed
    over the first ``n_blocks_for_order`` blocks only, which must be <= len(blocks)); ``shuffle=False`` ->
    ``positions % len(blocks)`` (eval, probe set).
    ``objective='clm'``: labels = input_ids (the model shifts). ``'mlm'``: each non-pad token is selected with
    probability ``mlm_probability`` (at least one per sample); selected tokens become ``<mask>`` (80%), a random
    non-special token (10%) or stay (10%); labels = original id where selected, -100 elsewhere. The mask of a sample
    depends only on (seed, its position) -> identical on any rank layout and after a resume.
    """
    if blocks.dim() != 2 or len(blocks) == 0:
        raise ValueError(f"blocks must be a non-empty [N, seq_len] tensor, got shape {tuple(blocks.shape)}")
    pos = torch.as_tensor(positions, dtype=torch.long).reshape(-1)
    if pos.numel() and int(pos.min()) < 0:
        raise ValueError("stream positions must be >= 0")
    if shuffle:
        n_order = len(blocks) if n_blocks_for_order is None else int(n_blocks_for_order)
        if not 1 <= n_order <= len(blocks):
            raise ValueError(f"n_blocks_for_order={n_blocks_for_order} must be in [1, {len(blocks)}]")
        idx = block_indices(pos, n_order, seed)
    else:
        idx = pos % len(blocks)
    x = blocks[idx].long()
    if objective == "clm":
        return {"input_ids": x, "labels": x.clone()}
    if objective == "mlm":
        if not 0 < mlm_probability < 1:
            raise ValueError(f"mlm_probability={mlm_probability} must be in (0, 1)")
        inputs, labels = _mlm_mask(x, pos, tokenizer, mlm_probability, seed)
        return {"input_ids": inputs, "labels": labels}
    raise ValueError(f"objective={objective!r} is not 'clm' or 'mlm'")


def eval_batch_count(n_blocks: int, micro_batch: int, world_size: int, max_batches: int) -> int:
    """Batches per rank in one evaluation pass: the SAME on every rank (ZeRO-3 gathers parameters collectively, so
    ranks must run the same number of forwards). Full batches only; at least one (wrapping round a tiny set)."""
    count = max(1, n_blocks // (micro_batch * world_size))
    return min(count, max_batches) if max_batches > 0 else count


def iter_eval_batches(blocks: torch.Tensor, micro_batch: int, rank: int, world_size: int, max_batches: int,
                      objective: str, tokenizer: Tokenizer, mlm_probability: float,
                      seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """Evaluation batches of ``rank``: batch k holds positions ``(k*world_size + rank)*mb + [0, mb)`` (mod
    ``len(blocks)``), so within a pass no block is seen twice unless the set is smaller than one global batch.
    ``shuffle=False`` and masks seeded by (seed, position): every evaluation sees the same inputs and masks."""
    if micro_batch < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need micro_batch >= 1 and 0 <= rank < world_size, got {micro_batch}, {rank}, {world_size}")
    n = len(blocks)
    for k in range(eval_batch_count(n, micro_batch, world_size, max_batches)):
        start = (k * world_size + rank) * micro_batch
        yield make_batch(blocks, torch.arange(start, start + micro_batch) % n, objective=objective,
                         tokenizer=tokenizer, mlm_probability=mlm_probability, seed=seed, shuffle=False)
