"""What every benchmark script shares: where the figures go and how the machine is named."""

from __future__ import annotations

import os
import platform

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def append_results(text: str) -> None:
    """Append a section to benchmarks/RESULTS.md."""
    with open(RESULTS, "a") as f:
        f.write(text)
