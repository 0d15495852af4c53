"""How many CPUs this process may use (shared by the tile readers and tissue detection)."""

from __future__ import annotations

import os


def available_cpus() -> int:
    """CPUs this process may use: SLURM's allocation, else the affinity mask, else all."""
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "").strip()
    if slurm.isdigit() and int(slurm) > 0:
        return int(slurm)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
