"""The job folder as the viewer sees it: slide ids from the manifest, and nothing else.

Every file the server touches is derived from a slide id that exists in
``<job>/manifest.json`` and is checked to stay inside the folder it belongs to. Request
data never becomes a path.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from slidevl.errors import InputError, NotFoundError
from slidevl.features.jobs import row_key
from slidevl.features.slidepaths import SlideRecord, resolve_slide
from slidevl.features.store import (
    SCHEMA_VERSION,
    FeatureStore,
    FeatureStoreError,
    read_slide_attrs,
)

MANIFEST = "manifest.json"
# Ids are file stems; anything that could act as a path component is refused at load time.
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\- ]{0,199}$")


class JobError(InputError):
    """The job folder or its manifest cannot be used; the message names the file and the fix."""


class UnknownSlideError(NotFoundError, KeyError):
    """A slide id that the job's manifest does not list."""


class NotAvailableError(NotFoundError):
    """The slide is known but the requested output (features, tissue, evidence…) does not exist."""


@dataclass(frozen=True)
class SlideEntry:
    """One manifest row, reduced to what the viewer shows."""

    slide_id: str
    slide: SlideRecord
    status: str
    n_patches: int | None
    error: str | None
    raw: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.slide_id, "status": self.status, "n_patches": self.n_patches, "error": self.error}


@dataclass(frozen=True)
class PatchTable:
    """The geometry of a slide's feature file (no feature vectors: the viewer never needs them)."""

    coords: np.ndarray
    tissue: np.ndarray
    region_index: np.ndarray
    patch_size: float
    region_coords: np.ndarray | None
    region_size: float | None
    pack_coords: np.ndarray | None
    pack_size: float | None
    attrs: dict[str, Any]

    @property
    def n(self) -> int:
        return int(len(self.coords))

    def index_at(self, x: float, y: float) -> int | None:
        """Row of the patch covering level-0 point (x, y), or None."""
        if not self.n:
            return None
        dx = x - self.coords[:, 0]
        dy = y - self.coords[:, 1]
        hit = np.flatnonzero((dx >= 0) & (dx < self.patch_size) & (dy >= 0) & (dy < self.patch_size))
        return int(hit[0]) if hit.size else None

    def in_box(self, bbox: tuple[float, float, float, float]) -> np.ndarray:
        """Boolean mask of patches whose centre lies inside ``bbox`` (x0, y0, x1, y1)."""
        centre = self.coords + self.patch_size / 2
        return (centre[:, 0] >= bbox[0]) & (centre[:, 0] < bbox[2]) & (centre[:, 1] >= bbox[1]) & (centre[:, 1] < bbox[3])


def _entry_from(raw: dict[str, Any], manifest: Path) -> SlideEntry:
    slide_id = raw.get("slide_id")
    if not isinstance(slide_id, str) or not _SAFE_ID.match(slide_id) or ".." in slide_id:
        raise JobError(f"{manifest}: slide id {slide_id!r} is not a plain file stem; fix the manifest entry")
    n = raw.get("n_patches")
    return SlideEntry(
        slide_id=slide_id,
        slide=SlideRecord.from_entry(raw),
        status=str(raw.get("status", "unknown")),
        n_patches=int(n) if isinstance(n, (int, float)) else None,
        error=raw.get("error") if isinstance(raw.get("error"), str) else None,
        raw=raw,
    )


def read_geometry(path: Path) -> PatchTable:
    """Coordinates and sizes from a feature file, without loading the feature matrices.

    The viewer only draws where patches are; reading ``patch/features`` (N × D) for that
    would cost hundreds of MB on a large slide, so only the coordinate datasets of the
    store's layout are read.
    """
    try:
        attrs = read_slide_attrs(path)
        if attrs.get("schema_version") != SCHEMA_VERSION:
            raise JobError(f"{path}: feature schema {attrs.get('schema_version')!r}, expected {SCHEMA_VERSION}; "
                           "re-run `slidevl preprocess` for this slide")
        if "patch_size_level0" not in attrs:
            raise JobError(f"{path}: attribute 'patch_size_level0' missing; re-run `slidevl preprocess` for this slide")
        with h5py.File(path, "r") as f:
            def get(name: str) -> np.ndarray | None:
                return f[name][()] if name in f else None
            coords, tissue, region_index = get("patch/coords"), get("patch/tissue_fraction"), get("patch/region_index")
            region_coords, pack_coords = get("region/coords"), get("pack/coords")
    except (FeatureStoreError, OSError, KeyError) as exc:
        raise JobError(f"{path}: unreadable feature file ({exc}); re-run `slidevl preprocess` for this slide") from exc
    if coords is None or tissue is None or region_index is None:
        raise JobError(f"{path}: patch/coords, patch/tissue_fraction or patch/region_index missing; re-run `slidevl preprocess`")
    patch = float(attrs["patch_size_level0"])
    return PatchTable(
        coords=np.asarray(coords, np.int64).reshape(-1, 2),
        tissue=np.asarray(tissue, np.float32),
        region_index=np.asarray(region_index, np.int64),
        patch_size=patch,
        region_coords=region_coords,
        region_size=float(attrs.get("region_size_level0", patch * int(attrs.get("region_patches", 16)))),
        pack_coords=pack_coords,
        pack_size=float(attrs.get("pack_size_level0", patch * int(attrs.get("pack_size", 3)))),
        attrs=attrs,
    )


class ServeJob:
    """Read-only view of a job folder, re-reading the manifest when it changes on disk."""

    def __init__(self, job_dir: str | Path, *, survival_run: str | Path | None = None,
                 rois_dir: str | Path | None = None, encoder: str | None = None,
                 slides_root: str | Path | None = None) -> None:
        self.job_dir = Path(job_dir).resolve()
        self.slides_root = Path(slides_root).resolve() if slides_root else None
        if not (self.job_dir / MANIFEST).is_file():
            raise JobError(f"{self.job_dir / MANIFEST}: no manifest; run `slidevl preprocess SLIDES --out {self.job_dir}` first")
        self.survival_run = Path(survival_run).resolve() if survival_run else None
        if self.survival_run is not None and not self.survival_run.is_dir():
            raise JobError(f"{self.survival_run}: survival run folder not found; pass the folder `slidevl survival` wrote")
        self.rois_dir = Path(rois_dir).resolve() if rois_dir else self.job_dir / "rois"
        self._encoder = encoder
        self._lock = threading.Lock()
        self._manifest_mtime: float | None = None
        self._entries: dict[str, SlideEntry] = {}
        self._patches: dict[str, tuple[float, PatchTable]] = {}
        self._load_manifest()

    # -- manifest ---------------------------------------------------------------------------
    def _load_manifest(self) -> None:
        path = self.job_dir / MANIFEST
        mtime = path.stat().st_mtime
        if mtime == self._manifest_mtime:
            return
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise JobError(f"{path}: unreadable manifest ({exc}); re-run `slidevl preprocess` to rewrite it") from exc
        rows = data.get("slides") if isinstance(data, dict) else None
        if not isinstance(rows, list):
            raise JobError(f"{path}: expected an object with a 'slides' list; re-run `slidevl preprocess`")
        if not all(isinstance(raw, dict) for raw in rows):
            raise JobError(f"{path}: every entry of 'slides' must be an object")
        # A job of several encoders has a row per slide and encoder: the viewer shows one encoder's.
        folders = sorted({f for f in (row_key(raw)[1] for raw in rows) if f})
        if self._encoder is None and len(folders) > 1:
            raise JobError(f"{self.job_dir}: holds the features of several encoders ({', '.join(folders)}); "
                           "pick one with --encoder")
        entries: dict[str, SlideEntry] = {}
        for raw in rows:
            folder = row_key(raw)[1]
            if self._encoder is not None and folder not in (None, self._encoder):
                continue
            entry = _entry_from(raw, path)
            if folder is not None or entry.slide_id not in entries:  # a row of the encoder beats one naming none
                entries[entry.slide_id] = entry
        self._entries, self._manifest_mtime = entries, mtime

    def slides(self) -> list[SlideEntry]:
        with self._lock:
            self._load_manifest()
            return list(self._entries.values())

    def get(self, slide_id: str) -> SlideEntry:
        with self._lock:
            self._load_manifest()
            entry = self._entries.get(slide_id)
        if entry is None:
            raise UnknownSlideError(slide_id)
        return entry

    # -- per-slide files --------------------------------------------------------------------
    def slide_file(self, slide_id: str) -> Path:
        """The slide's image file; raises :class:`~slidevl.features.slidepaths.SlideFileError` naming the paths tried."""
        return resolve_slide(self.get(slide_id).slide, self.job_dir, self.slides_root)

    @staticmethod
    def _inside(root: Path, rel: str) -> Path | None:
        # Ids and manifest paths are vetted here so that nothing outside ``root`` is ever read.
        root = root.resolve()
        path = (root / rel).resolve()
        return path if path.is_relative_to(root) else None

    def _feature_path(self, slide_id: str) -> Path | None:
        try:
            store = FeatureStore(self.job_dir, self._encoder)
        except FeatureStoreError:
            return None
        return self._inside(store.root, f"{slide_id}.h5")

    def file_for(self, slide_id: str, kind: str) -> Path | None:
        """Path of a per-slide output (``features``, ``tissue``, ``rois``, ``evidence``) if it exists.

        Features and tissue come from the manifest entry's ``output`` / ``tissue`` (job-relative)
        when it names them, else from the job's conventional layout.
        """
        entry = self.get(slide_id)
        path: Path | None = None
        if kind in ("features", "tissue"):
            listed = entry.raw.get("output" if kind == "features" else "tissue")
            if isinstance(listed, str) and listed:
                path = self._inside(self.job_dir, listed)
            elif kind == "features":
                path = self._feature_path(entry.slide_id)
            else:
                path = self._inside(self.job_dir / "tissue", f"{entry.slide_id}.geojson")
        elif kind == "rois":
            path = self._inside(self.rois_dir, f"{entry.slide_id}.json")
        elif kind == "evidence" and self.survival_run is not None:
            path = self._inside(self.survival_run / "evidence", f"{entry.slide_id}.json")
        return path if path is not None and path.is_file() else None

    def read_json(self, slide_id: str, kind: str) -> Any:
        path = self.file_for(slide_id, kind)
        if path is None:
            raise NotAvailableError(f"no {kind} output for slide {slide_id}")
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise JobError(f"{path}: unreadable JSON ({exc}); rewrite it with the command that produced it") from exc

    def patches(self, slide_id: str) -> PatchTable:
        """The slide's patch/region/pack geometry from the feature store, cached by file mtime."""
        path = self.file_for(slide_id, "features")
        if path is None:
            raise NotAvailableError(f"no features for slide {slide_id}")
        mtime = path.stat().st_mtime
        with self._lock:
            hit = self._patches.get(slide_id)
        if hit is not None and hit[0] == mtime:
            return hit[1]
        table = read_geometry(path)
        with self._lock:
            self._patches[slide_id] = (mtime, table)
        return table

    def mpp(self, slide_id: str, slide_mpp: float | None) -> float | None:
        """The mpp the features were computed at (it honours --mpp-override), else the slide's own."""
        try:
            recorded = self.patches(slide_id).attrs.get("mpp")
        except NotAvailableError:
            recorded = None
        return float(recorded) if recorded else slide_mpp
