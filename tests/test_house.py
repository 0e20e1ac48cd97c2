"""The house rules that code review cannot keep by itself: the model-agnostic core never imports the adapters (or the
facade, the trainer, anything outside ``mat_ds/core``), and the facade is the one place that does."""
from __future__ import annotations

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parents[1] / "mat_ds" / "core"


def _imports(path: Path) -> set[str]:
    """Modules imported by ``path``, absolute (``mat_ds.x.y``) for relative imports inside the package."""
    package = ["mat_ds", *path.relative_to(CORE.parent).parent.parts]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}  # "from . import x" names module x
    return out


def test_the_core_imports_nothing_of_mat_ds_outside_the_core():
    offenders = {}
    for path in sorted(CORE.glob("*.py")):
        bad = sorted(m for m in _imports(path) if m.startswith("mat_ds.") and not m.startswith("mat_ds.core"))
        if bad:
            offenders[path.name] = bad
    assert not offenders, offenders


def test_the_facade_is_where_adapters_meet_the_core():
    wrapper = _imports(CORE.parent / "wrapper.py")
    assert "mat_ds.adapters" in wrapper and "mat_ds.core.engine" in wrapper


def _rank_queries(path: Path) -> list[str]:
    """Calls of ``get_rank``/``get_world_size`` (torch.distributed's or deepspeed.comm's) in ``path``, as line:name."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
            if name in ("get_rank", "get_world_size"):
                out.append(f"{node.lineno}:{name}")
    return out


def test_ranks_and_group_sizes_are_read_in_the_topology_only():
    # One home for the parallel layout (mat_ds/core/topology.py): everything else asks a Topology, or rank_in /
    # size_of for a group DeepSpeed made. A rank read ad hoc is how a TP rank ends up sharding data over the world.
    package = CORE.parent
    offenders = {str(p.relative_to(package)): q for p in sorted(package.rglob("*.py"))
                 if p != CORE / "topology.py" and (q := _rank_queries(p))}
    assert not offenders, offenders
    assert _rank_queries(CORE / "topology.py"), "the check itself must see the calls where they are"
