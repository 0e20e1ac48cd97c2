"""Cache files of ``mat_ds.data``: cache keys, atomic writes and the main-rank-first / barrier protocol.

Only the main rank writes caches (to a temporary name, then ``os.replace``); ``_main_first`` runs the writer on the
main rank before the barrier and on the other ranks after it, and re-raises a failure of the main rank after its
barrier so that the other ranks are released (they then fail with ``_missing_after_barrier``'s ``DataError``).
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any, Callable, Optional

from .sources import DataError

# Bump when the tokenizer training recipe or the packing format changes: invalidates old cache entries.
_CACHE_VERSION = 1


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
