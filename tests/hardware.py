"""What the accelerator of THIS machine supports, asked exactly as mat_ds asks it (``mat_ds/wrapper.py``
``check_supported``: ``deepspeed.accelerator.get_accelerator().is_fp16_supported()``).

Hardware-dependent expectations of the tests follow this answer instead of assuming one: DeepSpeed's CPU accelerator
reports fp16 on CPUs whose oneDNN has fp16 (``torch.ops.mkldnn._is_mkldnn_fp16_supported()``, e.g. Xeons with
AVX512-FP16/AMX), and not elsewhere. The test process asks here (to decide which tests exist), the launched ranks ask
the same function and report their answer in their results, and a test asserts that both agree. ``tests/conftest.py``
prints the branch taken in pytest's terminal summary.
"""
from __future__ import annotations

_asked: dict[str, object] = {}  # "fp16" -> the answer, once asked in this process (read by tests/conftest.py)


def fp16_supported() -> bool:
    """``get_accelerator().is_fp16_supported()``, as a bool (DeepSpeed's CPU accelerator returns None for "no")."""
    if "fp16" not in _asked:
        from deepspeed.accelerator import get_accelerator

        accel = get_accelerator()
        _asked["fp16"] = bool(accel.is_fp16_supported())
        _asked["device"] = accel.device_name()
    return bool(_asked["fp16"])


def bf16_supported() -> bool:
    """``get_accelerator().is_bf16_supported()``, as a bool."""
    if "bf16" not in _asked:
        from deepspeed.accelerator import get_accelerator

        _asked["bf16"] = bool(get_accelerator().is_bf16_supported())
    return bool(_asked["bf16"])


def fp16_branch() -> str | None:
    """One line naming the fp16 branch this process took, or None if no test asked."""
    if "fp16" not in _asked:
        return None
    if _asked["fp16"]:
        return (f"fp16 branch: supported by DeepSpeed's {_asked['device']} accelerator here -> the fp16 cells run "
                f"(precision matrix, gpu_check dry run); the fp16 refusal is not generated")
    return (f"fp16 branch: unsupported by DeepSpeed's {_asked['device']} accelerator here -> the one-line fp16 "
            f"refusal is tested; no fp16 cell is generated")
