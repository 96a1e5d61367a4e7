"""The machine a benchmark ran on, for its JSON record (shared by the benchmark scripts)."""

import os
import platform

import torch


def machine() -> dict:
    """CPU model (from /proc/cpuinfo where there is one), logical CPUs, Python and torch versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__}
