"""Which process of a multi-process launch this is, known before any process group exists.

``accelerate launch`` and ``torchrun`` set ``RANK`` for every worker; MPI launchers set
their own variable. A command reads this to print its final or interrupt line once,
from the main process, even when the signal arrives before the accelerator is built.
"""

from __future__ import annotations

import os

_RANK_VARIABLES = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK")


def launch_rank() -> int:
    """The global rank given by the launcher; 0 when not launched as one of several processes."""
    for name in _RANK_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return 0


def is_main_process() -> bool:
    """True in a single-process run and in rank 0 of a multi-process one."""
    return launch_rank() == 0
