"""Session-wide reporting: which hardware branch the hardware-dependent tests took (``tests/hardware.py``)."""
from __future__ import annotations

from collections import Counter


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    from tests.hardware import fp16_branch

    line = fp16_branch()
    if line is None:  # no collected test asked the accelerator
        return
    # the fp16 tests that ran (cells and accepted configs, or refusals: whichever branch was generated), per file and
    # outcome
    counts: Counter = Counter()
    for outcome in ("passed", "failed", "error", "skipped"):
        for rep in terminalreporter.stats.get(outcome, []):
            nodeid = getattr(rep, "nodeid", "")
            if "fp16" in nodeid and (outcome != "passed" or rep.when == "call"):
                counts[(nodeid.split("::", 1)[0].rsplit("/", 1)[-1], outcome)] += 1
    ran = ", ".join(f"{f} {n} {o}" for (f, o), n in sorted(counts.items())) or "none in this selection"
    terminalreporter.write_sep("-", "hardware branch")
    terminalreporter.write_line(line)
    terminalreporter.write_line(f"fp16 tests run: {ran}")
