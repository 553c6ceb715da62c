"""The machine a measurement ran on: what benchmark JSONs, reports and checkpoints record.

Figures taken on a loaded machine are told apart by the load average recorded with them.
"""

from __future__ import annotations

import os
import platform

import numba
import numpy as np

__all__ = ["cpu_name", "machine_info"]


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` knows."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return cpu


def machine_info() -> dict:
    """CPU model, core count, Numba threads, load average and software versions."""
    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "numba_threads": numba.config.NUMBA_NUM_THREADS,
        "loadavg_1min": os.getloadavg()[0],
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
    }
