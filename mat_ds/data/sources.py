"""Loading text for ``mat_ds.data``: local files, the embedded corpus and Hugging Face hub datasets, with validation.

``load_texts`` reads the training/validation/test text: the embedded corpus (``'default'``, ``DEFAULT_CORPUS`` under
``mat_ds/corpus/``), local text files (a file, a directory of ``*.txt``, a glob; ``.gz`` is read directly) or a Hugging
Face hub dataset (``'hf:NAME[:CONFIG[:SPLIT]]'``). Local files are checked first (exists, not blank, strict UTF-8) so
that a bad file is a one-line ``DataError`` naming the path instead of a deep traceback.

Also here: ``DataError`` (every user-facing data problem in ``mat_ds.data``) and ``text_digest``, the content hash
that keys the tokenizer and block caches.
"""
from __future__ import annotations

import codecs
import contextlib
import glob as _glob
import gzip
import hashlib
import os
import re
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

if TYPE_CHECKING:  # pragma: no cover
    import datasets

DEFAULT_CORPUS: Path = Path(__file__).resolve().parent.parent / "corpus" / "wikitext2_valid.txt.gz"

_GLOB_CHARS = re.compile(r"[*?\[]")


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
# Text digest
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
