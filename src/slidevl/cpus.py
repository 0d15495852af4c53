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


#: Idle OpenMP threads sleep instead of spinning between answers. Set before torch loads.
OPENMP_WAIT = {"OMP_WAIT_POLICY": "PASSIVE"}


def interactive_openmp() -> None:
    """Let idle OpenMP threads sleep (unless the user chose otherwise), for processes that wait on a person.

    An answering process spends most of its life waiting; spinning threads then steal the
    CPU from everything else, and on a busy machine each answer took 5x the CPU and up to
    10x the wall time. The work is split as before, so the numbers are the same. It only
    takes effect when called before torch is imported.
    """
    for key, value in OPENMP_WAIT.items():
        os.environ.setdefault(key, value)


#: The variables torch's CPU thread pools read when torch is imported.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def set_torch_threads(threads: int) -> None:
    """Run torch's CPU work, in this process and in those it starts, on ``threads`` threads.

    Torch is imported here: its OpenMP runtime may already be loaded by another library and
    would then no longer read the environment, so only ``torch.set_num_threads`` is sure. The
    environment carries the setting to child processes (tile readers, a warm ``ask`` server).
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    for key in THREAD_VARIABLES:
        os.environ[key] = str(threads)
    import torch

    torch.set_num_threads(threads)
