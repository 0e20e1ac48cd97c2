"""Elastic resume: a checkpoint written at one layout (data- or tensor-parallel size, ZeRO stage) resumed at another, through
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
* Tensor parallelism (DeepSpeed AutoTP + mat_ds's head-wise sharding, ZeRO-1/2, fp32): TP 2 -> TP 1, TP 1 -> TP 2
  and TP 2 x DP 2 -> TP 2 x DP 1 resume through a universal copy (HF LLaMA-GQA; also GPT-NeoX, Phi-3 and bf16
  TP 2 -> 1; tests/test_universal.py): MAT's
  state equal, every weight bit for bit, frozen units unchanged, the next losses within 2.4e-7 of the uninterrupted
  run's (another TP size sums in another order). Head-wise units are saved under their global names with an affine
  map (core/tensor_parallel.py), and mat_ds's converter (``python -m mat_ds.universal``, what the automatic
  conversion runs) works around two DeepSpeed 0.19.8 ``ds_to_universal`` defects that otherwise stop the conversion
  of such a checkpoint or its load: zero-element parameters are missing from the ``param_shapes`` the converter
  reads (``converter_input``), and an empty ``step.pt`` is written for a parameter TP rank 0 does not hold
  (``repair_steps``). Refused in one line: a TP change under ZeRO-0 (nothing to convert; a universal copy loads
  only through a ZeRO optimizer), and TP re-layouts of checkpoints saved before units had global names.

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
import math
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
# How a TP > 1 save names its head-wise unit parameters: "global" (``w{u}`` = global unit u, whole on the rank that
# owns it, emptied on the others; described to DeepSpeed by an affine map). Saves without it named them per rank.
TP_UNIT_NAMES = "global"
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
    dp = int(getattr(engine, "dp_world_size", 0) or max(world // tp, 1))
    micro_fn, accum_fn = (getattr(engine, k, None) for k in ("train_micro_batch_size_per_gpu",
                                                            "gradient_accumulation_steps"))
    if callable(micro_fn) and callable(accum_fn):  # samples per optimizer step: TP ranks of a replica share theirs
        batch = int(micro_fn()) * int(accum_fn()) * dp
    else:
        batch_fn = getattr(engine, "train_batch_size", None)
        batch = int(batch_fn()) if callable(batch_fn) else None
    out = {"world": world, "dp": dp, "tp": tp, "ep": ep, "zero_stage": stage, "global_batch": batch}
    if tp > 1:
        out["tp_units"] = TP_UNIT_NAMES  # head-wise units under their global names (core/tensor_parallel.py)
    return out


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


def convert_command(save_dir: str, tag: str, tp: int = 1) -> str:
    """The command that makes ``TAG_universal`` by hand: DeepSpeed's converter; under tensor parallelism mat_ds's
    wrapper of it, which also repairs the ``step`` files DeepSpeed 0.19.8 writes wrong there (``repair_steps``)."""
    src = os.path.join(save_dir, tag)
    tool = "mat_ds.universal" if tp > 1 else "deepspeed.checkpoint.ds_to_universal --inject_missing_state"
    return f"python -m {tool} --input_folder {src} --output_folder {src}{SUFFIX}"


def decide(src: dict, cur: dict, policy: str, tag_is_universal: bool, save_dir: str = "", tag: str = "") -> str:
    """'plain' (DeepSpeed's ordinary load) or 'universal' (through ``TAG_universal``); raises ``Refusal``."""
    where = f"checkpoint {tag} was written at {describe(src)}; this run is {describe(cur)}"
    cur_family, src_family = _family_of(cur), _family_of(src)
    src_tp, cur_tp = src.get("tp") or 1, cur.get("tp") or 1
    if tag_is_universal or policy == "always":
        if cur_family == "0":
            raise Refusal(f"{where}: a universal checkpoint loads into ZeRO stage 1, 2 or 3 only (DeepSpeed restores "
                          f"its weights through the ZeRO optimizer); set zero_optimization.stage 1-3, or resume "
                          f"{tag.removesuffix(SUFFIX)} without --universal always")
    tp_changed = src_tp != cur_tp
    dp_changed = src.get("dp") is not None and src["dp"] != cur.get("dp")
    ep_changed = src.get("ep") is not None and src["ep"] != cur.get("ep")
    stage_changed = (src.get("zero_stage") is not None and cur.get("zero_stage") is not None
                     and src["zero_stage"] != cur["zero_stage"])
    relayout = tp_changed or dp_changed or ep_changed or stage_changed or tag_is_universal or policy == "always"
    if src_tp > 1 and relayout and not src.get("inferred") and src.get("tp_units") != TP_UNIT_NAMES:
        raise Refusal(f"{where}: it was saved by a mat_ds that named each TP rank's head-wise units w0.. locally (the "
                      f"same name for different units on different ranks), which no universal checkpoint can "
                      f"re-shard; resume it at {describe(src)}")
    if src_family and cur_family and src_family != cur_family:
        raise Refusal(f"{where}: DeepSpeed cannot load a ZeRO-{src_family} checkpoint into ZeRO-{cur_family}, not even "
                      f"through a universal checkpoint; resume with zero_optimization.stage "
                      f"{'0' if src_family == '0' else ('1 or 2' if src_family == '1/2' else '3')}")
    if tp_changed and "0" in (src_family, cur_family):
        raise Refusal(f"{where}: DeepSpeed re-shards tensor-parallel weights only through a universal checkpoint, "
                      f"which ZeRO-0 can neither make (no ZeRO optimizer fragments to convert) nor load (its weights "
                      f"are restored through a ZeRO optimizer); resume at TP {src_tp}, or train with "
                      f"zero_optimization.stage 1 or 2")
    if tag_is_universal:
        if max(src.get("ep") or 1, cur.get("ep") or 1) > 1:
            raise Refusal(f"{where}: DeepSpeed's universal checkpoint does not support deepspeed.moe expert "
                          f"parallelism (moe_ep_size > 1)")
        return "universal"
    if not relayout:
        return "plain"
    if src_family == "0" and cur_family == "0" and policy != "always":
        return "plain"  # ZeRO-0 keeps the whole optimizer state in mp_rank_*: any DP size loads it as it is
    if max(src.get("ep") or 1, cur.get("ep") or 1) > 1:
        raise Refusal(f"{where}: DeepSpeed 0.19.8's ds_to_universal cannot convert deepspeed.moe expert-parallel "
                      f"checkpoints (moe_ep_size > 1: every rank names its local experts alike); resume at "
                      f"{describe(src)} (world size {src.get('world', src.get('dp'))})")
    if policy == "never":
        raise Refusal(f"{where}: DeepSpeed re-partitions ZeRO state only through a universal checkpoint, and "
                      f"--universal never forbids converting; run `{convert_command(save_dir, tag, src_tp)}` and "
                      f"rerun with --resume {universal_tag(tag)}, or drop --universal never to let mat_ds convert it")
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
    cmd = [sys.executable, "-m", "mat_ds.universal", "--input_folder", os.path.join(save_dir, tag),
           "--output_folder", out, "--num_extract_workers", str(extract), "--num_merge_workers", str(merge)]
    log = os.path.join(staging, "convert.log")
    env = dict(os.environ)  # the converter imports this very mat_ds, wherever it was imported from
    home = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([home, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    with open(log, "w", encoding="utf-8") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=save_dir, start_new_session=True, env=env)
    return proc, staging, log


def _last_line(log: str) -> str:
    try:
        with open(log, encoding="utf-8", errors="replace") as fh:
            lines = [l.strip() for l in fh.read().splitlines() if l.strip()]
    except OSError:
        return ""
    errors = [l for l in lines if re.match(r"^[A-Za-z_.]*(Error|Exception)\b", l)]
    return " ".join((errors or lines or [""])[-1].split())[:200]


def _step_files(udir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(udir, "zero", "*", "step.pt")))


def _is_bad_step(value) -> bool:
    import torch

    return torch.is_tensor(value) and value.numel() != 1


def bad_steps(udir: str) -> list[str]:
    """The parameters of universal copy ``udir`` whose ``zero/NAME/step.pt`` is not a step count.

    DeepSpeed 0.19.8's ``ds_to_universal`` (``_merge_zero_shards``) fills the slot of a TP rank that holds none of a
    parameter with an empty tensor of that rank's shape, also for the Adam ``step``, and then saves the FIRST slot as
    ``step.pt``: a parameter its TP rank 0 does not hold (every head-wise unit of TP ranks 1..) gets an empty tensor
    as its step, and DeepSpeed's loader then fails comparing steps ("Boolean value of Tensor with no values is
    ambiguous"). AutoTP's own uneven splits leave only the LAST ranks empty, which is why DeepSpeed does not see it."""
    import torch

    out = []
    for path in _step_files(udir):
        if _is_bad_step(torch.load(path, map_location="cpu", weights_only=False)):
            out.append(os.path.basename(os.path.dirname(path)))
    return out


def repair_steps(udir: str) -> int:
    """Give every parameter of universal copy ``udir`` whose ``step.pt`` is malformed (``bad_steps``) the step count
    all the others carry; raises ``Refusal`` when those disagree (then no single value is right). Returns how many
    files it rewrote."""
    import torch

    good, bad = [], []
    for path in _step_files(udir):
        value = torch.load(path, map_location="cpu", weights_only=False)
        (bad if _is_bad_step(value) else good).append((path, value))
    if not bad:
        return 0
    values = {float(v) for _, v in good}
    if len(values) != 1:
        raise Refusal(f"the universal copy {udir} has {len(bad)} malformed step.pt files (DeepSpeed's ds_to_universal "
                      f"under tensor parallelism) and its other parameters disagree on the step count "
                      f"({sorted(values)[:4]}), so none can be repaired")
    step = good[0][1]
    for path, _ in bad:
        tmp = f"{path}.{os.getpid()}.tmp"
        torch.save(step.clone() if torch.is_tensor(step) else step, tmp)
        os.replace(tmp, path)
    return len(bad)


def _finish(save_dir: str, tag: str, staging: str, source: dict, seconds: float) -> None:
    """The converted copy gets its ``step`` files repaired (``repair_steps``) and its manifest, then takes the name
    ``TAG_universal`` in one rename (a stale copy of that name is moved aside first and removed after)."""
    from .checkpoint import _DELETING, write_manifest

    utag = universal_tag(tag)
    repair_steps(os.path.join(staging, utag))
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
                    except Refusal as exc:
                        status = ("failed", str(exc))
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


def repair_loads(engine) -> None:
    """Make ``engine.load_checkpoint`` run ``fix_param_groups`` after every ZeRO-3 universal load, so a user's own loop
    (``"checkpoint": {"load_universal": true}`` in the JSON, then ``engine.load_checkpoint(dir[, tag])``) resumes with
    the optimizer state the trainer's ``checkpoint.load`` gets, not DeepSpeed's defective one. ``mat_ds.initialize``
    (``wrapper.attach``) installs it; a no-op for every other load."""
    load = engine.load_checkpoint

    def load_checkpoint(load_dir, tag=None, **kwargs):
        path, client = load(load_dir, tag=tag, **kwargs)
        optimizer_loaded = kwargs.get("load_optimizer_states", True) and not kwargs.get("load_module_only", False)
        if path is not None and optimizer_loaded and wants_universal(engine) and int(
                engine.zero_optimization_stage()) == 3:
            if tag is None:  # what DeepSpeed read: load_dir/latest_universal
                with open(os.path.join(load_dir, "latest_universal")) as f:
                    tag = f.read().strip()
            fix_param_groups(engine, os.path.join(load_dir, str(tag)))
        return path, client

    load_checkpoint.repairs_universal = True  # checkpoint.load must not repair twice
    engine.load_checkpoint = load_checkpoint


def repairs_loads(engine) -> bool:
    return bool(getattr(engine.load_checkpoint, "repairs_universal", False))


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
        _check_steps(tag_dir, where=f"universal checkpoint {tag}", fix=f"make it with `python -m mat_ds.universal "
                     f"--input_folder SOURCE_TAG --output_folder {tag_dir}`, which repairs them")
        return Plan("universal", tag, src, note=f"[mat_ds] loading universal checkpoint {tag} at {describe(cur)}"
                                           + _batch_note(src, cur))
    state = existing_copy(save_dir, tag)
    if state == "foreign":
        _check_steps(os.path.join(save_dir, universal_tag(tag)), where=f"the universal copy {universal_tag(tag)} "
                     f"found next to {tag} (made outside mat_ds)", fix=f"remove it to let mat_ds convert {tag}, or "
                     f"make it with `{convert_command(save_dir, tag, 2)}`")
    how = {"fresh": f"its universal copy {universal_tag(tag)}",
           "foreign": f"the universal copy {universal_tag(tag)} found next to it (made outside mat_ds)",
           "stale": f"a universal copy, converting it now into {universal_tag(tag)} (replacing a stale copy of an "
                    f"earlier {tag})"}.get(state, f"a universal copy, converting it now into {universal_tag(tag)}")
    note = (f"[mat_ds] checkpoint {tag} was written at {describe(src)}; this run is {describe(cur)}: resuming through "
            f"{how}") + _batch_note(src, cur)
    return Plan("universal", universal_tag(tag), src, convert=state in ("none", "stale"), note=note)


def _check_steps(udir: str, where: str, fix: str) -> None:
    bad = bad_steps(udir)
    if bad:
        raise Refusal(f"{where} has {len(bad)} malformed zero/*/step.pt files (e.g. {bad[0]}: an empty tensor, not a "
                      f"step count; DeepSpeed 0.19.8's ds_to_universal writes them for parameters its TP rank 0 does "
                      f"not hold), which DeepSpeed's loader cannot read; {fix}")


def _batch_note(src: dict, cur: dict) -> str:
    a, b = src.get("global_batch"), cur.get("global_batch")
    if a and b and a != b:
        return (f" (global batch {a} -> {b} samples: the trainer's data order is a function of (seed, step), so the "
                f"run continues by step, not from the same sample)")
    return ""


def converter_input(src: str, work: str) -> str:
    """``src``, or (under tensor parallelism) a view of it in ``work`` that DeepSpeed 0.19.8's ``ds_to_universal``
    can convert: mat_ds keeps every head-wise unit registered on every TP rank under its global name, emptied where
    another rank owns it (core/tensor_parallel.py), and DeepSpeed leaves zero-element parameters out of the
    optimizer (``runtime.utils.is_optimized_parameter``) and so out of the ``param_shapes`` its converter reads:
    such a name has no shape on the ranks that do not own it, and the converter stops ("'NoneType' object is not
    iterable" in ``_merge_zero_shards``). The view lists them there with their empty shapes (the shapes of the
    model state in the same file); every other file is a symbolic link to the source, which is never written."""
    import torch
    from deepspeed.checkpoint.constants import PARAM_SHAPES

    files = sorted(glob.glob(os.path.join(src, "mp_rank_*_model_states.pt")))
    states = {f: torch.load(f, map_location="cpu", weights_only=False, mmap=True) for f in files}
    shapes = {f: sd.get(PARAM_SHAPES) for f, sd in states.items()}
    if len(files) < 2 or not all(isinstance(v, list) and v and all(isinstance(g, dict) for g in v)
                                 for v in shapes.values()):
        return src
    held = {n for groups in shapes.values() for g in groups for n, shape in g.items() if math.prod(shape)}
    fixed = {}
    for f, sd in states.items():
        known = {n for g in shapes[f] for n in g}
        missing = {n: t.shape for n, t in (sd.get("module") or {}).items()
                   if n in held and n not in known and t.numel() == 0}
        if missing:
            shapes[f][0].update(missing)
            fixed[f] = sd
    if not fixed:
        return src
    view = os.path.join(work, os.path.basename(os.path.normpath(src)))
    os.makedirs(view)
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if path in fixed:
            torch.save(fixed[path], os.path.join(view, name))
        else:
            os.symlink(os.path.abspath(path), os.path.join(view, name))
    return view


def main(argv: Optional[list] = None) -> int:
    """``python -m mat_ds.universal --input_folder TAG --output_folder TAG_universal``: DeepSpeed's ``ds_to_universal
    --inject_missing_state`` on ``converter_input(TAG)``, then ``repair_steps``. What mat_ds's automatic conversion
    runs; the same by hand (DeepSpeed's tool alone cannot convert a mat_ds checkpoint saved under TP > 1)."""
    import argparse
    import runpy
    import tempfile

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--input_folder", required=True)
    parser.add_argument("--output_folder", required=True)
    parser.add_argument("--num_extract_workers", type=int, default=_workers()[0])
    parser.add_argument("--num_merge_workers", type=int, default=_workers()[1])
    args = parser.parse_args(argv)
    out = os.path.abspath(args.output_folder)
    work = tempfile.mkdtemp(prefix=".mat_ds_input.", dir=os.path.dirname(out))
    try:
        src = converter_input(os.path.abspath(args.input_folder), work)
        if src != os.path.abspath(args.input_folder):
            print(f"[mat_ds] converting {args.input_folder} through {src} (zero-element TP placeholders listed in "
                  f"param_shapes)", flush=True)
        saved_argv = sys.argv
        sys.argv = ["ds_to_universal", "--inject_missing_state", "--input_folder", src, "--output_folder", out,
                    "--num_extract_workers", str(args.num_extract_workers),
                    "--num_merge_workers", str(args.num_merge_workers)]
        try:
            runpy.run_module("deepspeed.checkpoint.ds_to_universal", run_name="__main__", alter_sys=True)
        finally:
            sys.argv = saved_argv
    finally:
        shutil.rmtree(work, ignore_errors=True)
    try:
        n = repair_steps(out)
    except Refusal as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if n:
        print(f"[mat_ds] repaired {n} zero/*/step.pt files (see mat_ds.universal.bad_steps)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
