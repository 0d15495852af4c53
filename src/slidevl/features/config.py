"""Configuration of a preprocessing run (slides -> multi-scale features)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping

from slidevl.cpus import available_cpus
from slidevl.errors import ConfigError
from slidevl.slide.mpp import load_mpp_csv
from slidevl.slide.tissue import TissueParams
from slidevl.tiling.grid import GridSpec


# More readers than this rarely help one encoder and each holds a slide handle, a few
# hundred MiB of memory and its prefetched batches.
MAX_DEFAULT_WORKERS = 8


def default_workers() -> int:
    """Tile-reading worker processes: one per available CPU but one (kept for the main
    process, which encodes or feeds the GPU), at most 8, and at least min(2, cpus).

    The floor matters on small machines: with the hand-crafted encoder the workers do
    nearly all the work while the main process mostly waits, so 2 workers on 2 CPUs
    beat 1.
    """
    cpus = available_cpus()
    return max(min(2, cpus), min(cpus - 1, MAX_DEFAULT_WORKERS))


@dataclass(frozen=True)
class PreprocessConfig:
    """Everything that decides what `preprocess` writes (and a few knobs that do not).

    Fields that change the outputs enter the completeness fingerprint (see
    :mod:`slidevl.features.jobs`), so changing them re-runs slides on the next call.
    """

    grid: GridSpec = field(default_factory=GridSpec)
    tissue: TissueParams = field(default_factory=TissueParams)
    min_tissue: float = 0.25  # keep patches with at least this tissue fraction
    encoder: str = "handcrafted"
    region_encoder: str = "mean"
    device: str = "cpu"
    precision: str = "auto"  # forward pass of network encoders: auto | fp32 | bf16 (see encoders.base)
    mpp_override: float | None = None
    mpp_table: Mapping[str, float] | None = None  # slide_id -> mpp (from --mpp-csv)
    pack_features: bool = True  # summary features of the stitched 3x3 pack images
    global_feature: bool = True  # thumbnail feature for the topo-pack encoder
    float16: bool = True  # feature dtype on disk
    # Execution knobs: they do not change the results.
    batch_size: int = 64
    workers: int = field(default_factory=default_workers)
    shard: tuple[int, int] | None = None  # (i, n): the i-th (0-based) of n shards
    overwrite: bool = False
    qc_max_side: int = 2048
    progress: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_tissue <= 1.0:
            raise ConfigError(f"min_tissue must be in [0, 1], got {self.min_tissue}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.workers < 0:
            raise ConfigError(f"workers must be >= 0, got {self.workers}")
        from slidevl.features.encoders.base import PRECISIONS  # imports torch: only when a config is built

        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.mpp_override is not None and not self.mpp_override > 0:
            raise ConfigError(f"mpp override must be > 0, got {self.mpp_override}")
        if self.shard is not None:
            i, n = self.shard
            if not (n >= 1 and 0 <= i < n):
                raise ConfigError(f"shard must be i/n with 0 <= i < n, got {i}/{n}")

    def with_mpp_csv(self, path: str | Path) -> "PreprocessConfig":
        """Copy with the per-slide mpp table loaded from a ``slide_id,mpp`` CSV."""
        return replace(self, mpp_table=load_mpp_csv(path))

    def public_dict(self) -> dict[str, object]:
        """JSON-able summary for the manifest."""
        return {
            "grid": self.grid.as_dict(),
            "tissue": self.tissue.as_dict(),
            "min_tissue": self.min_tissue,
            "encoder": self.encoder,
            "region_encoder": self.region_encoder,
            "device": self.device,
            "precision": self.precision,
            "mpp_override": self.mpp_override,
            "mpp_csv_slides": len(self.mpp_table) if self.mpp_table else 0,
            "pack_features": self.pack_features,
            "global_feature": self.global_feature,
            "float16": self.float16,
            "batch_size": self.batch_size,
            "workers": self.workers,
            "shard": list(self.shard) if self.shard else None,
            "overwrite": self.overwrite,
        }


def parse_shard(text: str) -> tuple[int, int]:
    """Parse ``"i/n"`` (0-based i) into a tuple, with a clear error."""
    try:
        i_text, n_text = text.split("/")
        i, n = int(i_text), int(n_text)
    except ValueError:
        raise ConfigError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise ConfigError(f"--shard {text}: need 0 <= i < n (shards are numbered from 0)")
    return i, n


def slurm_array_shard(environ: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """The shard of a Slurm array task, or None outside an array.

    ``sbatch --array=1-10`` numbers tasks 1..10: the shard is the task id minus
    ``SLURM_ARRAY_TASK_MIN``, out of ``SLURM_ARRAY_TASK_COUNT``, so any id range
    (``0-9``, ``1-10``, ``5-14``) splits the batch into that many disjoint parts.
    """
    env = os.environ if environ is None else environ
    task, count = env.get("SLURM_ARRAY_TASK_ID", "").strip(), env.get("SLURM_ARRAY_TASK_COUNT", "").strip()
    if not (task and count):
        return None
    try:
        i = int(task) - int(env.get("SLURM_ARRAY_TASK_MIN", "0").strip() or 0)
        n = int(count)
    except ValueError:
        raise ConfigError(
            f"SLURM_ARRAY_TASK_ID={task!r} / SLURM_ARRAY_TASK_COUNT={count!r} are not integers; pass --shard i/n instead"
        ) from None
    if not (n >= 1 and 0 <= i < n):
        raise ConfigError(
            f"Slurm array task {task} is outside 0..{n - 1} after subtracting SLURM_ARRAY_TASK_MIN; "
            "use a contiguous --array range (e.g. --array=0-9) or pass --shard i/n"
        )
    return i, n
