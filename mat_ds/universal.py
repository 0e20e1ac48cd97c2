"""Elastic resume: a checkpoint written at one layout (data-parallel size, ZeRO stage) resumed at another, through
DeepSpeed's universal checkpoint (``deepspeed.checkpoint.ds_to_universal`` + ``"checkpoint": {"load_universal": true}``).

What DeepSpeed 0.19.8 does with mat_ds checkpoints (measured on CPU/gloo, mat_ds's trainer, MAT freezing heads; the
resumed run's losses compared with an uninterrupted run; ``docs/elastic_resume.md`` has the table):

* ZeRO-1/2: a tag written at DP 2 loads at DP 1 only through a universal copy (the plain load stops with DeepSpeed's
  "Automatic adjustment of ZeRO's optimizer state partitioning ... not currently supported"). MAT's per-unit parameters
  (``blocks.l.attn.qkv.w{u}``, ...) convert like any parameter: one ``zero/NAME/{fp32,exp_avg,exp_avg_sq}.pt`` each.
  The resumed losses equal the uninterrupted run's bit for bit; frozen units' weights stay exactly unchanged. A ZeRO-1
  tag also loads into ZeRO-2 (and back) this way.
* ZeRO-0: nothing to convert. The whole optimizer state is in ``mp_rank_00_model_states.pt``, which any DP size loads
  (measured: same losses). A universal copy can't be made from it (no ``*_optim_states.pt``), and a universal copy
  does not load into stage 0 (weights are restored through the ZeRO optimizer, which stage 0 lacks).
* ZeRO-3: converts and loads, but DeepSpeed's stage-3 universal loader
  (``load_hp_checkpoint_state_from_checkpoint_dir_stage3``) gives EVERY param group the hyperparameters of group 0
  (the trainer's no-decay group of biases and norms came back with weight decay 0.01) and one shared ``step`` tensor
  to all groups (Adam increments it once per group: step 24 instead of 18 six steps after the resume). The losses
  drifted from the uninterrupted run's (6.7e-4 after 6 steps). ``fix_param_groups`` repairs both after the load.
* Stage families do not cross: a universal copy from stage 1/2 fails inside DeepSpeed's stage-3 loader (an
  AssertionError) and a stage-3 copy has no ``mp_rank_*_model_states.pt`` for stages 1/2. One line instead.
* deepspeed.moe with expert parallelism (``moe_ep_size`` > 1): ``ds_to_universal`` fails (each rank names its local
  experts ``deepspeed_experts.0..``, so fragments of different experts meet under one name: "shape '[256]' is invalid
  for input of size 512"). Refused before converting. MoE with ``moe_ep_size`` 1 converts and resumes exactly.
* Tensor parallelism (mat_ds's own sharding of the head-wise layers is being built): a TP change, or a DP change under
  TP > 1, is refused with one line for now.

How mat_ds uses it (``checkpoint.load``; the trainer's ``--universal auto|never|always``):

* every save records the writer's layout (world, DP, TP, EP, ZeRO stage, global batch) in ``TAG/mat_ds_files.json``
  and marks the model convertible (``universal_checkpoint_info``), so plain ``ds_to_universal`` accepts the tag;
* at load, rank 0 compares that layout with the running engine's (``plan``). Same layout: DeepSpeed's ordinary load.
  Different, and DeepSpeed can do it: ``auto`` converts once (rank 0 runs ``ds_to_universal`` in a subprocess into a
  hidden staging directory while the other ranks wait on a 2 s heartbeat, so no collective times out however long it
  takes), writes the copy's own manifest (with the source tag's fingerprint), renames it to ``TAG_universal`` in one
  step, and loads it with DeepSpeed's ``load_universal`` switched on for that one call. A later resume from the same
  tag reuses the copy. ``never`` stops instead with one line that gives the exact conversion command. Different,
  and DeepSpeed cannot: one line saying why. ``--resume TAG_universal`` (a copy made by hand) loads as it is.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Optional

SUFFIX = "_universal"
STAGING = ".universal."  # prefix of the hidden directory a conversion writes into (never a resume candidate)
POLICIES = ("auto", "never", "always")
HEARTBEAT_SECONDS = 2.0
_FILES_RE = re.compile(r"(?:^|_)zero_pp_rank_(\d+)_mp_rank_(\d+)_(model|optim)_states\.pt$")
_MP_RE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")


def universal_tag(tag: str) -> str:
    return tag + SUFFIX


def family(stage: Optional[int]) -> Optional[str]:
    """Stages whose checkpoints share a format: '0' | '1/2' | '3' (None: unknown)."""
    return None if stage is None else {0: "0", 1: "1/2", 2: "1/2", 3: "3"}.get(int(stage))


# ----------------------------------------------------------------------------------------------------------------------
# Layouts: the running engine's, and the one that wrote a tag
# ----------------------------------------------------------------------------------------------------------------------
def layout_of(engine) -> dict:
    """The running engine's layout (no collective; the same on every rank)."""
    import torch.distributed as dist

    stage_fn = getattr(engine, "zero_optimization_stage", None)
    stage = int(stage_fn()) if callable(stage_fn) else 0
    topology = getattr(getattr(engine, "mat", None), "topology", None)
    tp = int(getattr(topology, "tp_size", 0) or 0)
    if not tp:
        autotp = getattr(engine, "autotp_size", None)
        tp = int((autotp() if callable(autotp) else 1) or 1)
    ep = 1
    module = getattr(engine, "module", None)
    if module is not None:
        ep = max([int(getattr(m, "ep_size", 1) or 1) for m in module.modules() if _is_moe_layer(m)], default=1)
    from .core.topology import Topology  # the one home of ranks and group sizes

    world = Topology.current().world
    batch_fn = getattr(engine, "train_batch_size", None)
    return {"world": world, "dp": int(getattr(engine, "dp_world_size", 0) or max(world // tp, 1)), "tp": tp, "ep": ep,
            "zero_stage": stage, "global_batch": int(batch_fn()) if callable(batch_fn) else None}


def _is_moe_layer(module) -> bool:
    try:
        from deepspeed.moe.layer import MoE
    except ImportError:  # pragma: no cover - deepspeed is a dependency
        return False
    return isinstance(module, MoE)


def mark_convertible(engine, layout: dict) -> None:
    """Make the checkpoint DeepSpeed writes carry ``universal_checkpoint_info``, which ``ds_to_universal`` requires
    (without it: "Required universal_checkpoint_info state is missing"). Only when nothing set it (AutoTP does), and
    not under tensor or expert parallelism, whose layouts this bare version key would not describe (``decide``
    refuses those)."""
    module = getattr(engine, "module", None)
    if module is None or (layout.get("tp") or 1) > 1 or (layout.get("ep") or 1) > 1:
        return
    from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                                UNIVERSAL_CHECKPOINT_VERSION_VALUE)

    if getattr(module, UNIVERSAL_CHECKPOINT_INFO, None) is None:
        info = {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}
        setattr(module, UNIVERSAL_CHECKPOINT_INFO, info)


def is_universal(tag_dir: str) -> bool:
    return os.path.isfile(os.path.join(tag_dir, "zero", "optimizer_state.pt"))


def _read_manifest(tag_dir: str) -> dict:
    from .checkpoint import MANIFEST

    try:
        with open(os.path.join(tag_dir, MANIFEST), encoding="utf-8") as fh:
            data = json.load(fh)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def source_layout(tag_dir: str) -> dict:
    """The layout that wrote ``tag_dir``: from its manifest (mat_ds saves record it), else read off DeepSpeed's file
    names (stage family, DP and TP sizes; ``zero_stage`` stays None when 1 and 2 cannot be told apart)."""
    recorded = _read_manifest(tag_dir).get("layout")
    if isinstance(recorded, dict):
        return dict(recorded)
    names = os.listdir(tag_dir) if os.path.isdir(tag_dir) else []
    dp, tp, kinds = set(), set(), set()
    for name in names:
        m = _FILES_RE.search(name)
        if m:
            dp.add(int(m.group(1)))
            tp.add(int(m.group(2)))
            kinds.add(m.group(3))
    mp = {int(m.group(1)) for m in map(_MP_RE.match, names) if m}
    if "model" in kinds:  # ZeRO-3 writes model states per DP rank
        return {"zero_stage": 3, "dp": len(dp), "tp": len(tp), "inferred": True}
    if is_universal(tag_dir):
        return {"zero_stage": None, "family": "1/2", "inferred": True, "tp": len(mp) or 1}
    if "optim" in kinds:
        return {"zero_stage": None, "family": "1/2", "dp": len(dp), "tp": len(tp), "inferred": True}
    return {"zero_stage": 0, "tp": len(mp) or 1, "inferred": True}  # DP size is only inside the file (irrelevant)


def _family_of(layout: dict) -> Optional[str]:
    return layout.get("family") or family(layout.get("zero_stage"))


def describe(layout: dict) -> str:
    parts = []
    if layout.get("dp"):
        parts.append(f"DP {layout['dp']}")
    if (layout.get("tp") or 1) > 1:
        parts.append(f"TP {layout['tp']}")
    if (layout.get("ep") or 1) > 1:
        parts.append(f"EP {layout['ep']}")
    stage = layout.get("zero_stage")
    parts.append(f"ZeRO-{stage}" if stage is not None else f"ZeRO-{_family_of(layout) or '?'}")
    return " ".join(parts)


# ----------------------------------------------------------------------------------------------------------------------
# The decision (pure: tested without a launcher)
# ----------------------------------------------------------------------------------------------------------------------
class Refusal(Exception):
    """A combination DeepSpeed cannot load (the message is one line; ``checkpoint.load`` raises it as
    ``CheckpointError``)."""


def convert_command(save_dir: str, tag: str) -> str:
    src = os.path.join(save_dir, tag)
    return (f"python -m deepspeed.checkpoint.ds_to_universal --inject_missing_state --input_folder {src} "
            f"--output_folder {src}{SUFFIX}")


def decide(src: dict, cur: dict, policy: str, tag_is_universal: bool, save_dir: str = "", tag: str = "") -> str:
    """'plain' (DeepSpeed's ordinary load) or 'universal' (through ``TAG_universal``); raises ``Refusal``."""
    where = f"checkpoint {tag} was written at {describe(src)}; this run is {describe(cur)}"
    cur_family, src_family = _family_of(cur), _family_of(src)
    if tag_is_universal or policy == "always":
        if cur_family == "0":
            raise Refusal(f"{where}: a universal checkpoint loads into ZeRO stage 1, 2 or 3 only (DeepSpeed restores "
                          f"its weights through the ZeRO optimizer); set zero_optimization.stage 1-3, or resume "
                          f"{tag.removesuffix(SUFFIX)} without --universal always")
        if (cur.get("tp") or 1) > 1:
            raise Refusal(f"{where}: universal checkpoints under tensor parallelism are not supported by mat_ds yet; "
                          f"resume at TP 1")
    tp_changed = (src.get("tp") or 1) != (cur.get("tp") or 1)
    dp_changed = src.get("dp") is not None and src["dp"] != cur.get("dp")
    ep_changed = src.get("ep") is not None and src["ep"] != cur.get("ep")
    stage_changed = (src.get("zero_stage") is not None and cur.get("zero_stage") is not None
                     and src["zero_stage"] != cur["zero_stage"])
    if tp_changed:
        raise Refusal(f"{where}: changing the tensor-parallel size on resume is not supported by mat_ds yet (its "
                      f"head-wise tensor parallelism has no universal-checkpoint description); resume at TP "
                      f"{src.get('tp') or 1}")
    if src_family and cur_family and src_family != cur_family:
        raise Refusal(f"{where}: DeepSpeed cannot load a ZeRO-{src_family} checkpoint into ZeRO-{cur_family}, not even "
                      f"through a universal checkpoint; resume with zero_optimization.stage "
                      f"{'0' if src_family == '0' else ('1 or 2' if src_family == '1/2' else '3')}")
    if tag_is_universal:
        if max(src.get("ep") or 1, cur.get("ep") or 1) > 1:
            raise Refusal(f"{where}: DeepSpeed's universal checkpoint does not support deepspeed.moe expert "
                          f"parallelism (moe_ep_size > 1)")
        return "universal"
    changed = dp_changed or ep_changed or stage_changed or policy == "always"
    if not changed:
        return "plain"
    if (src.get("tp") or 1) > 1:
        raise Refusal(f"{where}: changing the data-parallel size under tensor parallelism is not supported by mat_ds "
                      f"yet; resume at {describe(src)}")
    if src_family == "0" and cur_family == "0" and policy != "always":
        return "plain"  # ZeRO-0 keeps the whole optimizer state in mp_rank_00: any DP size loads it as it is
    if max(src.get("ep") or 1, cur.get("ep") or 1) > 1:
        raise Refusal(f"{where}: DeepSpeed 0.19.8's ds_to_universal cannot convert deepspeed.moe expert-parallel "
                      f"checkpoints (moe_ep_size > 1: every rank names its local experts alike); resume at "
                      f"{describe(src)} (world size {src.get('world', src.get('dp'))})")
    if policy == "never":
        raise Refusal(f"{where}: DeepSpeed re-partitions ZeRO state only through a universal checkpoint, and "
                      f"--universal never forbids converting; run `{convert_command(save_dir, tag)}` and rerun "
                      f"with --resume {universal_tag(tag)}, or drop --universal never to let mat_ds convert it")
    return "universal"


# ----------------------------------------------------------------------------------------------------------------------
# Conversion (rank 0, a subprocess; every rank calls ``convert_collectively``)
# ----------------------------------------------------------------------------------------------------------------------
def fingerprint(tag_dir: str) -> str:
    """Identifies the source tag's contents: its manifest's bytes (each save writes a fresh id into it), else the
    files' names, sizes and modification times."""
    from .checkpoint import MANIFEST, _tag_files

    path = os.path.join(tag_dir, MANIFEST)
    h = hashlib.sha256()
    if os.path.isfile(path):
        with open(path, "rb") as fh:
            h.update(fh.read())
    else:
        for name in _tag_files(tag_dir):
            st = os.stat(os.path.join(tag_dir, name))
            h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def existing_copy(save_dir: str, tag: str) -> str:
    """'fresh' (a mat_ds copy of this very tag), 'stale' (a mat_ds copy of an earlier tag of that name), 'foreign'
    (made outside mat_ds, e.g. by hand with ds_to_universal: used as it is) or 'none'."""
    udir = os.path.join(save_dir, universal_tag(tag))
    if not os.path.isdir(udir):
        return "none"
    manifest = _read_manifest(udir)
    if manifest.get("universal_of") != tag:
        return "foreign"
    return "fresh" if manifest.get("source_id") == fingerprint(os.path.join(save_dir, tag)) else "stale"


def _workers() -> tuple[int, int]:
    cpus = os.cpu_count() or 1
    return (1, 1) if cpus <= 2 else (min(4, cpus // 2), 2)


def _start(save_dir: str, tag: str) -> tuple[subprocess.Popen, str, str]:
    for old in glob.glob(os.path.join(save_dir, f"{STAGING}{tag}.*")):  # left by a killed conversion
        shutil.rmtree(old, ignore_errors=True)
    staging = os.path.join(save_dir, f"{STAGING}{tag}.{os.getpid()}")
    os.makedirs(staging)
    out = os.path.join(staging, universal_tag(tag))
    extract, merge = _workers()
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--inject_missing_state",
           "--input_folder", os.path.join(save_dir, tag), "--output_folder", out,
           "--num_extract_workers", str(extract), "--num_merge_workers", str(merge)]
    log = os.path.join(staging, "convert.log")
    with open(log, "w", encoding="utf-8") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=save_dir, start_new_session=True)
    return proc, staging, log


def _last_line(log: str) -> str:
    try:
        with open(log, encoding="utf-8", errors="replace") as fh:
            lines = [l.strip() for l in fh.read().splitlines() if l.strip()]
    except OSError:
        return ""
    errors = [l for l in lines if re.match(r"^[A-Za-z_.]*(Error|Exception)\b", l)]
    return " ".join((errors or lines or [""])[-1].split())[:200]


def _finish(save_dir: str, tag: str, staging: str, source: dict, seconds: float) -> None:
    """The converted copy gets its manifest, then takes the name ``TAG_universal`` in one rename (a stale copy of
    that name is moved aside first and removed after)."""
    from .checkpoint import _DELETING, write_manifest

    utag = universal_tag(tag)
    write_manifest(staging, utag, extra={"universal_of": tag, "source_id": fingerprint(os.path.join(save_dir, tag)),
                                         "layout": source, "convert_seconds": round(seconds, 3)})
    final = os.path.join(save_dir, utag)
    aside = None
    if os.path.isdir(final):
        aside = os.path.join(save_dir, f"{_DELETING}{utag}.{uuid.uuid4().hex[:8]}")
        os.rename(final, aside)
    os.rename(os.path.join(staging, utag), final)
    shutil.rmtree(staging, ignore_errors=True)  # DeepSpeed's latest_universal and the log
    if aside:
        shutil.rmtree(aside, ignore_errors=True)


def convert_collectively(save_dir: str, tag: str, source: dict, rank: int, broadcast) -> tuple[Optional[str], float]:
    """Rank 0 converts ``save_dir/tag`` into ``save_dir/TAG_universal``; the others wait on a heartbeat (a small
    broadcast every ``HEARTBEAT_SECONDS``, so no collective waits long). Returns (error line or None, seconds), the
    same on every rank."""
    t0 = time.perf_counter()
    proc = staging = log = None
    status: Optional[tuple] = None
    try:
        if rank == 0:
            try:
                proc, staging, log = _start(save_dir, tag)
            except OSError as exc:
                status = ("failed", f"cannot start the conversion: {exc.strerror or exc}")
        while True:
            if rank == 0 and status is None:
                try:
                    rc = proc.wait(timeout=HEARTBEAT_SECONDS)
                except subprocess.TimeoutExpired:
                    rc = None
                if rc == 0:
                    try:
                        _finish(save_dir, tag, staging, source, time.perf_counter() - t0)
                        status = ("done", None)
                    except OSError as exc:
                        status = ("failed", f"cannot put the converted copy in place: {exc.strerror or exc}")
                elif rc is not None:
                    why = _last_line(log) or ("killed, probably out of memory" if rc < 0 else f"exit status {rc}")
                    status = ("failed", f"DeepSpeed's ds_to_universal failed ({why}; log {log})")
            box = broadcast(status if status is not None else ("running", None))
            if box[0] != "running":
                return box[1], time.perf_counter() - t0
    finally:
        if proc is not None and proc.poll() is None:  # a peer died (the broadcast raised): stop the converter
            proc.kill()
            proc.wait()


# ----------------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------------
def wants_universal(engine) -> bool:
    """The DeepSpeed JSON's ``"checkpoint": {"load_universal": true}``."""
    return bool(getattr(getattr(engine, "_config", None), "load_universal_checkpoint", False))


@contextlib.contextmanager
def loading(engine, universal: bool):
    """DeepSpeed reads ``"checkpoint": {"load_universal"}`` only inside ``load_checkpoint``
    (``engine.load_universal_checkpoint()`` returns ``engine._config.load_universal_checkpoint``); mat_ds sets it for
    the one load that needs it, so later saves and same-layout resumes of the same run stay ordinary."""
    cfg = getattr(engine, "_config", None)
    if cfg is None or not hasattr(cfg, "load_universal_checkpoint"):
        if universal:
            raise Refusal("this engine has no DeepSpeed config to switch universal loading on")
        yield
        return
    before = cfg.load_universal_checkpoint
    cfg.load_universal_checkpoint = bool(universal)
    try:
        yield
    finally:
        cfg.load_universal_checkpoint = before


def fix_param_groups(engine, tag_dir: str) -> None:
    """ZeRO-3 only: two defects of DeepSpeed 0.19.8's stage-3 universal loader
    (``load_hp_checkpoint_state_from_checkpoint_dir_stage3``), repaired after it ran:

    * it copies param group 0's hyperparameters (weight decay, betas, ...) onto every group: each group's own are put
      back from the universal ``zero/optimizer_state.pt``;
    * it gives every sub-group's optimizer state THE SAME ``step`` tensor, which torch's Adam increments in place once
      per group, so the step count (and Adam's bias correction) ran ahead by the number of groups each step: each
      state gets its own copy."""
    if int(engine.zero_optimization_stage()) != 3:
        return
    import torch

    saved = torch.load(os.path.join(tag_dir, "zero", "optimizer_state.pt"), map_location="cpu", weights_only=False)
    saved = saved.get("param_groups") or saved.get("optimizer_state_dict", {}).get("param_groups")
    inner = engine.optimizer.optimizer
    groups = inner.param_groups
    if not saved or len(saved) != len(groups):
        raise Refusal(f"the universal checkpoint has {len(saved or [])} optimizer param groups, this run "
                      f"{len(groups)}: build the optimizer with the same param groups")
    for group, own in zip(groups, saved):
        for key, value in own.items():
            if key != "params":
                group[key] = value
    for state in inner.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


@dataclass
class Plan:
    mode: str  # "plain" | "universal"
    tag: str  # what DeepSpeed loads
    source: dict  # the layout that wrote the tag
    convert: bool = False  # rank 0 must make TAG_universal first (none yet, or a stale one of an earlier tag)
    note: str = ""  # what rank 0 prints (empty: nothing to say)


def plan(save_dir: str, tag: str, cur: dict, policy: str) -> Plan:
    """Rank 0's decision for ``save_dir/tag`` (raises ``Refusal``)."""
    tag_dir = os.path.join(save_dir, tag)
    src = source_layout(tag_dir)
    universal = is_universal(tag_dir)
    mode = decide(src, cur, policy, universal, save_dir, tag)
    if mode == "plain":
        note = ""
        if src.get("dp") and cur.get("dp") and src["dp"] != cur["dp"]:
            note = (f"[mat_ds] checkpoint {tag} was written at {describe(src)}; this run is {describe(cur)}: ZeRO-0 "
                    f"holds the whole optimizer state on every rank, loading it as it is")
        return Plan("plain", tag, src, note=note + _batch_note(src, cur) if note else "")
    if universal:
        return Plan("universal", tag, src, note=f"[mat_ds] loading universal checkpoint {tag} at {describe(cur)}"
                                           + _batch_note(src, cur))
    state = existing_copy(save_dir, tag)
    how = {"fresh": f"its universal copy {universal_tag(tag)}",
           "foreign": f"the universal copy {universal_tag(tag)} found next to it (made outside mat_ds)",
           "stale": f"a universal copy, converting it now into {universal_tag(tag)} (replacing a stale copy of an "
                    f"earlier {tag})"}.get(state, f"a universal copy, converting it now into {universal_tag(tag)}")
    note = (f"[mat_ds] checkpoint {tag} was written at {describe(src)}; this run is {describe(cur)}: resuming through "
            f"{how}") + _batch_note(src, cur)
    return Plan("universal", universal_tag(tag), src, convert=state in ("none", "stale"), note=note)


def _batch_note(src: dict, cur: dict) -> str:
    a, b = src.get("global_batch"), cur.get("global_batch")
    if a and b and a != b:
        return (f" (global batch {a} -> {b} samples: the trainer's data order is a function of (seed, step), so the "
                f"run continues by step, not from the same sample)")
    return ""
