"""Comparing what two runs hold, exactly: shared by the tests and the scripts they launch."""
from __future__ import annotations

import torch


def same(a, b, path: str = "") -> list[str]:
    """Where two nested states differ (dicts, lists, tensors bitwise with shape and dtype, numbers exactly; NaN
    equals NaN). Empty: identical."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}: keys {sorted(set(a) ^ set(b))}"] if set(a) != set(b) else []
        return out + [d for k in sorted(set(a) & set(b), key=str) for d in same(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{path}: length {len(a)} vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in same(x, y, f"{path}[{i}]")]
    if torch.is_tensor(a) and torch.is_tensor(b):
        return [] if a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b) else [f"{path}: tensors differ"]
    return [] if a == b or (a != a and b != b) else [f"{path}: {a!r} vs {b!r}"]
