"""Checkpoint and resume through DeepSpeed checkpoints, with MAT's state in ``client_state``; checkpoint retention; the
one-live-run-per-``out_dir`` lock.

What a checkpoint holds: DeepSpeed's model/optimizer/scheduler state (ZeRO-partitioned as DeepSpeed writes it) and, under
the ``"mat_ds"`` key of the client state, the step, cumulative FLOPs/tokens/time, and the policy state (frozen set and
λmax history, plus MAT's temporal reference Δ_1). Data order, MLM masks and dropout are functions of (seed, step), so
nothing else is needed for a resumed run to continue the same loss trajectory.

Writing (``save``): every rank writes its files, a barrier, then rank 0 writes ``TAG/mat_ds_files.json`` (every file of
the tag with its size) and only then points ``latest`` at the tag (atomic rename). DeepSpeed's own ``latest`` is not
used: it is written by rank 0 before the other ranks have finished, and non-atomically. So a SIGKILL at any moment
leaves ``latest`` naming a complete tag. Retention (``--keep_checkpoints``) runs after that, on rank 0.

Reading (``load``): rank 0 checks the tag's files first (each listed file exists with its recorded size, its zip
records pass their CRC check, and ``torch.load(mmap=True)`` unpickles it), so a truncated or missing shard is reported
before any rank starts loading. A checkpoint that cannot be loaded is ONE ``CheckpointError`` line, the same on every
rank (rank 0 prints it), naming the newest earlier checkpoint that passes the same check and the flag that resumes from
it; nothing on disk is modified or removed.

Elastic resume (``mat_ds/universal.py``): each manifest also records the writer's layout (world, DP, TP, EP, ZeRO
stage, global batch). A tag loaded at another layout goes through DeepSpeed's universal checkpoint: rank 0 converts it
once into ``TAG_universal`` (hidden staging directory, own manifest, one rename) and it is loaded with
``load_universal`` on for that call; combinations DeepSpeed cannot load are one ``CheckpointError`` line. Retention
removes a tag's ``TAG_universal`` copy together with the tag.

The lock (``RunLock``): rank 0 holds ``OUT_DIR/.mat_ds.lock`` with ``fcntl.flock`` for the run's life; the kernel
drops it when the process dies, so a SIGKILLed run never blocks its resume. The file carries the holder (host, pid,
start time) for the message a second launch gets.
"""
from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import sys
import uuid
import zipfile
from typing import Iterable, Optional

import torch
import torch.distributed as dist

from . import universal as uc
from .core.topology import Topology

CLIENT_KEY = "mat_ds"
MANIFEST = "mat_ds_files.json"
LATEST = "latest"
LOCK_NAME = ".mat_ds.lock"
_DELETING = ".deleting."  # prefix a tag directory is renamed to before it is removed (never a resume candidate)
_TAG_RE = re.compile(r"^global_step(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, or not from mat_ds. One line, says which tag and what to do.

    ``every_rank``: every rank raises the same error (an agreed decision), so only rank 0 prints it."""

    def __init__(self, message: str, every_rank: bool = False):
        super().__init__(message)
        self.every_rank = every_rank


class RunLockedError(CheckpointError):
    """``--out_dir`` is held by another live run."""


def tag_for(step: int) -> str:
    return f"global_step{step}"


def tag_step(tag: str) -> Optional[int]:
    """The step of a ``global_stepN`` tag, else None (user-named tags are never touched by retention)."""
    m = _TAG_RE.match(tag)
    return int(m.group(1)) if m else None


def _world() -> int:
    return Topology.current().world


def _rank() -> int:
    return Topology.current().rank


def _broadcast(value):
    """Rank 0's ``value`` on every rank (a no-op without a process group)."""
    if _world() > 1:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        value = box[0]
    return value


# ----------------------------------------------------------------------------------------------------------------------
# Checking a tag's files (cheap: sizes, zip CRCs, an mmap torch.load; no tensor is read into memory)
# ----------------------------------------------------------------------------------------------------------------------
def _tag_files(tag_dir: str) -> list[str]:
    out = []
    for root, _dirs, files in os.walk(tag_dir):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), tag_dir)
            if rel != MANIFEST and not name.endswith(".tmp"):
                out.append(rel)
    return sorted(out)


def _check_file(path: str) -> Optional[str]:
    """None if ``path`` is a readable torch checkpoint file, else a short reason."""
    try:
        if not zipfile.is_zipfile(path):
            return "is not a torch zip archive (truncated or overwritten)"
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()  # reads every record and checks its CRC-32
        if bad is not None:
            return f"is corrupt (CRC mismatch in record {os.path.basename(bad)})"
        torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as exc:  # noqa: BLE001 - any failure means the same: this file does not load
        text = " ".join(str(exc).split())[:80]
        return f"does not load ({type(exc).__name__}{': ' + text if text else ''})"
    return None


def verify_tag(save_dir: str, tag: str) -> Optional[str]:
    """None if every file of ``save_dir/tag`` checks out, else a short reason naming the first bad file.

    With the manifest ``save`` writes: each listed file must exist with its recorded size. Without one (a checkpoint
    from an older mat_ds, or a save killed before the manifest): the files present, at least one ``*model_states.pt``
    among them."""
    tag_dir = os.path.join(save_dir, tag)
    if not os.path.isdir(tag_dir):
        return "its directory does not exist"
    listed: Optional[dict] = None
    manifest = os.path.join(tag_dir, MANIFEST)
    if os.path.isfile(manifest):
        try:
            with open(manifest, encoding="utf-8") as fh:
                listed = dict(json.load(fh)["files"])
        except (OSError, ValueError, KeyError, TypeError):
            return f"{MANIFEST} is unreadable"
        for name, size in sorted(listed.items()):
            path = os.path.join(tag_dir, name)
            if not os.path.isfile(path):
                return f"missing file {name}"
            got = os.path.getsize(path)
            if got < size:
                return f"truncated file {name} ({got} of {size} bytes)"
            if got != size:
                return f"file {name} changed size ({got}, written as {size} bytes)"
        names = sorted(listed)
    else:
        names = _tag_files(tag_dir)
        if not any(n.endswith("model_states.pt") for n in names):
            return "no *model_states.pt file in it"
    for name in names:
        if name.endswith(".pt"):
            reason = _check_file(os.path.join(tag_dir, name))
            if reason:
                return f"{name} {reason}"
    return None


def list_tags(save_dir: str) -> list[str]:
    """The ``global_stepN`` tag directories in ``save_dir``, oldest step first."""
    try:
        names = os.listdir(save_dir)
    except OSError:
        return []
    tags = [n for n in names if tag_step(n) is not None and os.path.isdir(os.path.join(save_dir, n))]
    return sorted(tags, key=tag_step)


def newest_loadable(save_dir: str, before: Optional[int], exclude: Iterable[str] = ()) -> Optional[str]:
    """The newest ``global_stepN`` tag (N < ``before`` when given) whose files pass ``verify_tag``."""
    skip = set(exclude)
    for tag in reversed(list_tags(save_dir)):
        if tag in skip or (before is not None and tag_step(tag) >= before):
            continue
        if verify_tag(save_dir, tag) is None:
            return tag
    return None


def unloadable_message(save_dir: str, tag: str, reason: str) -> str:
    """The one line for a checkpoint that cannot be loaded, with the way out."""
    step = tag_step(tag)
    good = newest_loadable(save_dir, step, exclude=[tag])
    where = "earlier " if step is not None else "other "
    if good:
        hint = f"the newest {where}checkpoint that loads is {good}: rerun with --resume {good}"
    else:
        hint = (f"no {where}checkpoint in it loads: start over with --resume never (and a new --out_dir to keep "
                "these files)")
    return f"checkpoint {tag} in {save_dir} cannot be loaded: {reason}; {hint}"


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:120]}" if text else type(exc).__name__


# ----------------------------------------------------------------------------------------------------------------------
# Save, retention, load
# ----------------------------------------------------------------------------------------------------------------------
def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_manifest(save_dir: str, tag: str, extra: Optional[dict] = None) -> None:
    """``TAG/mat_ds_files.json``: every file with its size, a fresh id (a rewritten tag of the same name differs), and
    ``extra`` (the writer's layout; for a universal copy, the tag it was made from)."""
    tag_dir = os.path.join(save_dir, tag)
    files = {name: os.path.getsize(os.path.join(tag_dir, name)) for name in _tag_files(tag_dir)}
    data = {"tag": tag, "id": uuid.uuid4().hex, **(extra or {}), "files": files}
    _write_atomic(os.path.join(tag_dir, MANIFEST), json.dumps(data, indent=1))


def read_latest(save_dir: str) -> Optional[str]:
    path = os.path.join(save_dir, LATEST)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8", errors="replace") as fh:
        return fh.read().strip()


def retention_victims(tags: Iterable[str], keep: int, protect: Iterable[Optional[str]] = ()) -> list[str]:
    """Which ``global_stepN`` tags retention removes: all but the ``keep`` newest (by step) and the protected ones
    (``latest``, the tag just written, the best one). ``keep`` 0 keeps everything; other tag names are never removed."""
    if keep <= 0:
        return []
    ours = sorted((t for t in set(tags) if tag_step(t) is not None), key=tag_step)
    kept = set(ours[-keep:]) | {t for t in protect if t}
    return [t for t in ours if t not in kept]


def apply_retention(save_dir: str, keep: int, protect: Iterable[Optional[str]]) -> list[str]:
    """Remove the ``retention_victims`` (rank 0, after a completed save). Each victim is first renamed to
    ``.deleting.TAG`` (atomic), so a kill mid-removal never leaves a half-deleted tag that looks like a checkpoint."""
    removed = []
    for name in os.listdir(save_dir) if os.path.isdir(save_dir) else []:
        # left by a run killed while removing, or while converting (the run lock: no conversion runs now)
        if name.startswith(_DELETING) or name.startswith(uc.STAGING):
            shutil.rmtree(os.path.join(save_dir, name), ignore_errors=True)
    for tag in retention_victims(list_tags(save_dir), keep, protect):
        for name in (tag, uc.universal_tag(tag)):  # a tag's universal copy goes with it (derived data)
            if name != tag and not os.path.isdir(os.path.join(save_dir, name)):
                continue
            doomed = os.path.join(save_dir, _DELETING + name)
            try:
                os.rename(os.path.join(save_dir, name), doomed)
            except OSError as exc:  # retention is housekeeping: never end a run for it
                print(f"[mat_ds] warning: could not remove old checkpoint {name}: {exc.strerror or exc}", flush=True)
                break
            shutil.rmtree(doomed, ignore_errors=True)
            removed.append(name)
    return removed


def save(engine, save_dir: str, step: int, state: dict, keep: int = 0, best: Optional[str] = None) -> str:
    """Write a checkpoint after ``step`` optimizer steps (collective). ``latest`` names it only once every rank's files
    exist and the manifest is written; then retention keeps the ``keep`` newest tags plus ``latest`` and ``best``."""
    tag = tag_for(step)
    layout = uc.layout_of(engine)  # recorded for elastic resume (universal.plan)
    uc.mark_convertible(engine, layout)
    engine.save_checkpoint(save_dir, tag=tag, client_state={CLIENT_KEY: state}, save_latest=False)
    if _world() > 1:
        dist.barrier()  # DeepSpeed's save ends with a barrier too; this one is ours to rely on
    if _rank() == 0:
        write_manifest(save_dir, tag, extra={"layout": layout})
        _write_atomic(os.path.join(save_dir, LATEST), tag)
        apply_retention(save_dir, keep, protect=[tag, best])
    return os.path.join(save_dir, tag)


def load(engine, save_dir: str, resume: str, universal: str = "auto") -> Optional[dict]:
    """Resume according to ``resume`` ('auto' | 'never' | a tag). Returns the mat_ds state, or None to start fresh.

    ``universal`` ('auto' | 'never' | 'always'): a tag written at another layout (DP size, ZeRO stage) is loaded
    through DeepSpeed's universal checkpoint, converting it once into ``TAG_universal`` ('auto'), or stops with one
    line giving the conversion command ('never'); 'always' (also the DeepSpeed JSON's ``"checkpoint":
    {"load_universal": true}``) loads through a universal copy even at the same layout. A ``TAG_universal`` given as
    ``resume`` loads as it is (``mat_ds/universal.py``).

    Collective: every rank returns the same state or raises the same ``CheckpointError`` (``every_rank``)."""
    if universal not in uc.POLICIES:
        raise CheckpointError(f"universal={universal!r} must be one of {', '.join(uc.POLICIES)}")
    if uc.wants_universal(engine):
        if universal == "never":
            raise CheckpointError('the DeepSpeed config has "checkpoint": {"load_universal": true} but --universal '
                                  'is never: drop one of them')
        universal = "always"
    if resume == "never":
        return None
    if resume == "auto":
        tag = read_latest(save_dir)
        if tag is None:
            return None
        if not tag:
            reason = f"{os.path.join(save_dir, LATEST)} is empty"
            raise CheckpointError(_broadcast(unloadable_message(save_dir, "latest", reason) if _rank() == 0 else None),
                                  every_rank=True)
    else:
        tag = resume
    # Rank 0 checks the files before any rank loads: a bad shard must not leave one rank failing inside DeepSpeed
    # while the others wait for it in a collective.
    # The layout decision is rank 0's too (plain load, universal copy, or a one-line refusal), made before any rank
    # loads.
    message, plan = None, None
    if _rank() == 0:
        reason = verify_tag(save_dir, tag)
        if reason:
            message = unloadable_message(save_dir, tag, reason)
        else:
            try:
                plan = uc.plan(save_dir, tag, uc.layout_of(engine), universal)
            except uc.Refusal as exc:
                message = f"cannot resume from {os.path.join(save_dir, tag)}: {exc}"
    message, plan = _broadcast((message, plan))
    if message:
        raise CheckpointError(message, every_rank=True)
    if plan.note and _rank() == 0:
        print(plan.note, flush=True)
    if plan.convert:
        error, seconds = uc.convert_collectively(save_dir, tag, plan.source, _rank(), _broadcast)
        if error:
            raise CheckpointError(f"checkpoint {tag} in {save_dir} loads at this layout only through a universal "
                                  f"copy, and making it failed: {error}; nothing else on disk changed", every_rank=True)
        if _rank() == 0:
            print(f"[mat_ds] converted {tag} -> {plan.tag} in {seconds:.1f}s (DeepSpeed's ds_to_universal)", flush=True)
    if plan.tag != tag:  # the universal copy is checked like any tag
        message = None
        if _rank() == 0:
            reason = verify_tag(save_dir, plan.tag)
            if reason:
                message = (f"checkpoint {tag} in {save_dir} loads at this layout only through its universal copy "
                           f"{plan.tag}, which cannot be loaded: {reason}; remove {os.path.join(save_dir, plan.tag)} "
                           f"to have mat_ds convert {tag} again")
        message = _broadcast(message)
        if message:
            raise CheckpointError(message, every_rank=True)
    error = None
    try:
        with uc.loading(engine, plan.mode == "universal"):
            load_path, client = engine.load_checkpoint(save_dir, tag=plan.tag)
        if load_path is None or not client or CLIENT_KEY not in client:
            error = "not written by mat_ds (no mat_ds state in it)"
        elif plan.mode == "universal" and not uc.repairs_loads(engine):  # mat_ds.initialize's engine repairs itself
            uc.fix_param_groups(engine, os.path.join(save_dir, plan.tag))
    except Exception as exc:  # noqa: BLE001 - shape mismatch (another model/world size), unpickling, ...
        via = f", loading its universal copy {plan.tag}" if plan.tag != tag else ""
        error = f"incompatible with this run{via} ({_short(exc)})"
        client = None
    if _world() > 1:
        errors = [None] * _world()
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e), None)
    if error:
        raise CheckpointError(_broadcast(unloadable_message(save_dir, tag, error) if _rank() == 0 else None),
                              every_rank=True)
    # ZeRO-3 writes client state per rank; rank 0's copy is authoritative for everyone.
    return _broadcast(client[CLIENT_KEY])


# ----------------------------------------------------------------------------------------------------------------------
# One live run per out_dir
# ----------------------------------------------------------------------------------------------------------------------
def launch_rank() -> int:
    """This process's global rank before the process group exists (the launcher's ``RANK``; 0 without one)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


class RunLock:
    """``fcntl.flock`` on ``OUT_DIR/.mat_ds.lock``, held by rank 0 for the run's life (the kernel releases it when the
    process dies: no stale-pid heuristics). The file holds a JSON line naming the holder, for the refusal message.
    ``release`` removes the file (only if it is still the one locked), and the directory if the lock created it and
    it is empty, so a run that ends leaves nothing of the lock behind."""

    def __init__(self, out_dir: str, fd: int, created_dir: bool):
        self.out_dir, self.path = out_dir, os.path.join(out_dir, LOCK_NAME)
        self._fd, self._created_dir = fd, created_dir

    @classmethod
    def acquire(cls, out_dir: str) -> "RunLock":
        """Take the lock or raise ``RunLockedError`` naming the live holder."""
        created = not os.path.isdir(out_dir)
        try:
            os.makedirs(out_dir, exist_ok=True)
        except OSError as exc:
            raise CheckpointError(f"cannot create --out_dir {out_dir}: {exc.strerror or exc}") from None
        path = os.path.join(out_dir, LOCK_NAME)
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise CheckpointError(f"cannot open the run lock {path}: {exc.strerror or exc}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = _read_holder(fd)
                os.close(fd)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise CheckpointError(f"cannot lock {path}: {exc.strerror or exc}") from None
                raise RunLockedError(locked_message(out_dir, holder)) from None
            try:  # a releasing holder may have unlinked the file between our open and flock: lock the new one
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        info = {"host": socket.gethostname(), "pid": os.getpid(),
                "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                "master_port": os.environ.get("MASTER_PORT"), "argv": " ".join(sys.argv)[:500]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        return cls(out_dir, fd, created)

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            if os.path.samestat(os.fstat(self._fd), os.stat(self.path)):
                os.unlink(self.path)  # while still locked: a waiter that opened it re-checks the inode
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None
        if self._created_dir:
            try:
                os.rmdir(self.out_dir)  # only if empty (a run that failed before writing anything)
            except OSError:
                pass


def _read_holder(fd: int) -> Optional[dict]:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "null")
    except (OSError, ValueError):
        return None


def locked_message(out_dir: str, holder: Optional[dict]) -> str:
    if isinstance(holder, dict):
        who = (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started {holder.get('started', '?')}")
    else:
        who = "a process that has not written its details yet"
    return (f"--out_dir {out_dir} is in use by a live run ({who}; lock {os.path.join(out_dir, LOCK_NAME)}): wait for "
            "it to finish or stop it, or give another --out_dir")


def lock_out_dir(out_dir: str, init) -> Optional[RunLock]:
    """Collective start of a run: rank 0 takes the lock (before ``init``, the process-group start, so the message does
    not depend on the rendezvous), then every rank learns rank 0's decision. Returns the lock on rank 0, None
    elsewhere; raises ``RunLockedError`` (every_rank) on every rank when another live run holds ``out_dir``."""
    lock, refusal = None, None
    if launch_rank() == 0:
        try:
            lock = RunLock.acquire(out_dir)
        except CheckpointError as exc:
            refusal = str(exc)
    try:
        init()
    except Exception:  # noqa: BLE001
        if refusal:  # e.g. the live holder's launch uses the same --master_port: still the one-line refusal
            raise RunLockedError(refusal, every_rank=True) from None
        if lock:
            lock.release()
        raise
    try:
        refusal = _broadcast(refusal)
    except Exception:
        if lock:
            lock.release()
        raise
    if refusal:
        raise RunLockedError(refusal, every_rank=True)
    return lock
