"""Configuration of a preprocessing run (slides -> multi-scale features)."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping

from slidevl.config import Config, setting
from slidevl.cpus import available_cpus
from slidevl.errors import ConfigError
from slidevl.slide.mpp import load_mpp_csv
from slidevl.slide.tissue import TissueParams
from slidevl.tiling.grid import GridSpec


# More readers than this rarely help one encoder and each holds a slide handle, a few
# hundred MiB of memory and its prefetched batches.
MAX_DEFAULT_WORKERS = 8

#: PreprocessConfig fields that the job manifest does not record (see ``manifest_dict``).
MANIFEST_LEAVES_OUT = ("qc_max_side", "progress")


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
class PreprocessConfig(Config):
    """Everything that decides what `preprocess` writes (and a few knobs that do not).

    Fields that change the outputs enter the completeness fingerprint (see
    :mod:`slidevl.features.jobs`), so changing them re-runs slides on the next call.
    ``slidevl preprocess`` declares its options with these defaults (see
    :mod:`slidevl.features.cli`).
    """

    grid: GridSpec = setting(default_factory=GridSpec, help="Patch / region / pack lattice.")
    tissue: TissueParams = setting(default_factory=TissueParams, help="Tissue segmentation parameters.")
    min_tissue: float = setting(0.25, help="Keep patches with at least this tissue fraction.")
    encoder: str = setting("handcrafted", help="Tile encoder spec (see slidevl.features.encoders).")
    region_encoder: str = setting("mean", help="Region encoder over the 16x16 patch grid: mean, meanmax, vit:/dir.")
    device: str = setting("cpu", help="Device for the encoders (cpu, cuda, cuda:1, ...).")
    precision: str = setting(
        "auto", help="Forward pass of network encoders: auto (bf16 autocast on CUDA, fp32 elsewhere), fp32 or bf16.")
    mpp_override: float | None = setting(None, help="Use this slide mpp for every slide, ignoring the files.")
    mpp_table: Mapping[str, float] | None = setting(None, help="slide_id -> mpp (from --mpp-csv).")
    pack_features: bool = setting(True, help="Encode the stitched 3x3 pack images.")
    global_feature: bool = setting(True, help="Encode the whole-slide thumbnail.")
    float16: bool = setting(True, help="Store features as float16 (else float32).")
    # Execution knobs: they do not change the results.
    batch_size: int = setting(64, help="Tiles per batch.")
    workers: int = setting(default_factory=default_workers,
                           help="Tile-reading worker processes (default: usable CPUs - 1, at most 8, at least min(2, CPUs)).")
    shard: tuple[int, int] | None = setting(None, help="(i, n): the i-th (0-based) of n shards.")
    overwrite: bool = setting(False, help="Recompute slides that are already complete.")
    qc_max_side: int = setting(2048, help="Longest side of the QC images in pixels.")
    progress: bool = setting(True, help="Show progress bars.")

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

    def manifest_dict(self) -> dict[str, object]:
        """The settings recorded in the job manifest: :meth:`to_dict` with the per-slide mpp
        table summarised as its size (``mpp_csv_slides``; the table can hold thousands of
        slides) and without ``qc_max_side`` and ``progress``, which change no output."""
        out: dict[str, object] = {}
        for key, value in self.to_dict().items():
            if key == "mpp_table":
                out["mpp_csv_slides"] = len(value) if value else 0
            elif key not in MANIFEST_LEAVES_OUT:
                out[key] = value
        return out

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
