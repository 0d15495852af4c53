"""The per-slide feature store: one self-describing HDF5 file per slide.

Layout of ``<job>/features/<encoder>/<slide>.h5`` (schema version 1)::

    patch/features        (N, D)  float16 or float32
    patch/coords          (N, 2)  int64   level-0 x, y of the top-left corner
    patch/grid            (N, 2)  int64   (col, row) in the slide's global patch lattice
    patch/region_index    (N,)    int64   row into region/*
    patch/pack_index      (N,)    int64   row into pack/*
    patch/tissue_fraction (N,)    float32
    region/features       (R, D') optional
    region/coords, region/grid
    pack/features         (P, Dp) optional: summary features of the stitched pack images
    pack/coords, pack/grid
    global/features       (Dg,)   optional: thumbnail feature
    attrs                 provenance (schema version, encoder, mpp, sizes, ...)

Files produced by CLAM/TRIDENT carry only ``features`` + ``coords``; they are imported
into this layout by :mod:`slidevl.features.importer`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import h5py
import numpy as np

from slidevl.atomic import atomic_path
from slidevl.errors import InputError

SCHEMA_VERSION = 1
# Rows per chunk: large enough that reading a bag is a handful of I/O calls, never one row each.
_CHUNK_ROWS = 1024


class FeatureStoreError(InputError):
    """A feature file is missing, unreadable, or does not follow the schema."""


@dataclass
class SlideFeatures:
    """Everything the models need from one slide, as numpy arrays."""

    slide_id: str
    patch_features: np.ndarray
    patch_coords: np.ndarray
    patch_grid: np.ndarray
    patch_region: np.ndarray
    patch_pack: np.ndarray
    patch_tissue: np.ndarray
    region_features: np.ndarray | None = None
    region_coords: np.ndarray | None = None
    region_grid: np.ndarray | None = None
    pack_features: np.ndarray | None = None
    pack_coords: np.ndarray | None = None
    pack_grid: np.ndarray | None = None
    global_feature: np.ndarray | None = None
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def n_patches(self) -> int:
        return int(self.patch_features.shape[0])

    @property
    def pack_size(self) -> int:
        return int(self.attrs.get("pack_size", 3))

    def validate(self, source: str = "<memory>") -> None:
        """Check shapes and index ranges; raise :class:`FeatureStoreError` naming ``source``."""
        n = self.n_patches
        checks = [
            (self.patch_features.ndim == 2, "patch/features must be 2-D (N, D)"),
            (self.patch_coords.shape == (n, 2), "patch/coords must be (N, 2)"),
            (self.patch_grid.shape == (n, 2), "patch/grid must be (N, 2)"),
            (self.patch_region.shape == (n,), "patch/region_index must be (N,)"),
            (self.patch_pack.shape == (n,), "patch/pack_index must be (N,)"),
            (self.patch_tissue.shape == (n,), "patch/tissue_fraction must be (N,)"),
        ]
        for table, index in (("region", self.patch_region), ("pack", self.patch_pack)):
            coords = getattr(self, f"{table}_coords")
            if coords is not None and n:
                checks.append((index.min() >= 0 and index.max() < len(coords), f"patch/{table}_index out of range"))
            features = getattr(self, f"{table}_features")
            if features is not None and coords is not None:
                checks.append((len(features) == len(coords), f"{table}/features and {table}/coords differ in length"))
        for ok, message in checks:
            if not ok:
                raise FeatureStoreError(f"{source}: {message}; re-run `slidevl preprocess` for this slide")


def _write_array(group: h5py.Group, name: str, data: np.ndarray, dtype: Any = None) -> None:
    data = np.asarray(data if dtype is None else np.asarray(data).astype(dtype))
    kwargs: dict[str, Any] = {}
    if data.ndim >= 1 and data.shape[0] > 0:
        chunk = (min(_CHUNK_ROWS, data.shape[0]),) + data.shape[1:]
        kwargs = dict(chunks=chunk, compression="gzip", compression_opts=4, shuffle=True)
    group.create_dataset(name, data=data, **kwargs)


_JSON_TAG = "json:"


def _encode_attr(value: Any) -> Any:
    # HDF5 attributes hold scalars/strings/arrays; nested structures and None go in as
    # tagged JSON, and so does any string that could be mistaken for the tag.
    if isinstance(value, (dict, list, tuple)) or value is None or (isinstance(value, str) and value.startswith(_JSON_TAG)):
        return _JSON_TAG + json.dumps(value)
    return value


def _decode_attr(value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str) and value.startswith(_JSON_TAG):
        return json.loads(value[len(_JSON_TAG):])
    if isinstance(value, np.generic):
        return value.item()
    return value


def write_slide_features(path: str | Path, sf: SlideFeatures, *, float16: bool = True) -> Path:
    """Validate ``sf`` and write it to ``path`` atomically (temp file + rename)."""
    path = Path(path)
    sf.validate(str(path))
    feat_dtype = np.float16 if float16 else np.float32
    attrs = {"schema_version": SCHEMA_VERSION, "slide_id": sf.slide_id, **sf.attrs}
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            for key, value in attrs.items():
                f.attrs[key] = _encode_attr(value)
            patch = f.create_group("patch")
            _write_array(patch, "features", sf.patch_features, feat_dtype)
            _write_array(patch, "coords", sf.patch_coords, np.int64)
            _write_array(patch, "grid", sf.patch_grid, np.int64)
            _write_array(patch, "region_index", sf.patch_region, np.int64)
            _write_array(patch, "pack_index", sf.patch_pack, np.int64)
            _write_array(patch, "tissue_fraction", sf.patch_tissue, np.float32)
            for table in ("region", "pack"):
                coords = getattr(sf, f"{table}_coords")
                if coords is None:
                    continue
                group = f.create_group(table)
                _write_array(group, "coords", coords, np.int64)
                _write_array(group, "grid", getattr(sf, f"{table}_grid"), np.int64)
                features = getattr(sf, f"{table}_features")
                if features is not None:
                    _write_array(group, "features", features, feat_dtype)
            if sf.global_feature is not None:
                f.create_group("global").create_dataset("features", data=np.asarray(sf.global_feature, feat_dtype))
    return path


def read_slide_attrs(path: str | Path) -> dict[str, Any]:
    """Provenance attributes of a feature file without loading arrays."""
    path = Path(path)
    with _open(path) as f:
        return {k: _decode_attr(v) for k, v in f.attrs.items()}


def _open(path: Path) -> h5py.File:
    if not path.is_file():
        raise FeatureStoreError(f"{path}: feature file not found; run `slidevl preprocess` for this slide first")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise FeatureStoreError(f"{path}: not a readable HDF5 feature file ({exc}); delete it and re-run `slidevl preprocess`") from exc


def read_slide_features(path: str | Path, *, load: Iterable[str] = ("patch", "region", "pack", "global")) -> SlideFeatures:
    """Load a slide's feature file. ``load`` picks which optional tables to read."""
    path = Path(path)
    load = set(load)
    with _open(path) as f:
        attrs = {k: _decode_attr(v) for k, v in f.attrs.items()}
        version = attrs.get("schema_version")
        if version != SCHEMA_VERSION:
            raise FeatureStoreError(
                f"{path}: schema version {version!r}, expected {SCHEMA_VERSION}; re-run `slidevl preprocess` "
                "or `slidevl features import` to rewrite it"
            )
        if "patch" not in f:
            raise FeatureStoreError(f"{path}: no 'patch' group; this is not a slidevl feature file (import it with `slidevl features import`)")
        p = f["patch"]
        kwargs: dict[str, Any] = dict(
            patch_features=p["features"][()].astype(np.float32),
            patch_coords=p["coords"][()],
            patch_grid=p["grid"][()],
            patch_region=p["region_index"][()],
            patch_pack=p["pack_index"][()],
            patch_tissue=p["tissue_fraction"][()],
        )
        for table in ("region", "pack"):
            if table in f:
                g = f[table]
                kwargs[f"{table}_coords"] = g["coords"][()]
                kwargs[f"{table}_grid"] = g["grid"][()]
                if "features" in g and table in load:
                    kwargs[f"{table}_features"] = g["features"][()].astype(np.float32)
        if "global" in f and "global" in load:
            kwargs["global_feature"] = f["global"]["features"][()].astype(np.float32)
    sf = SlideFeatures(slide_id=str(attrs.get("slide_id", path.stem)), attrs=attrs, **kwargs)
    sf.validate(str(path))
    return sf


class FeatureStore:
    """The feature files of one job and one encoder: ``<job>/features/<encoder>/``."""

    def __init__(self, job_dir: str | Path, encoder: str | None = None) -> None:
        self.job_dir = Path(job_dir)
        root = self.job_dir / "features"
        if encoder is None:
            found = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
            if len(found) != 1:
                hint = f"found {found}" if found else f"no encoder folder under {root}"
                raise FeatureStoreError(
                    f"{self.job_dir}: cannot pick the feature encoder ({hint}); pass the encoder name explicitly"
                    if found else f"{self.job_dir}: no features ({hint}); run `slidevl preprocess SLIDES --out {self.job_dir}` first"
                )
            encoder = found[0]
        self.encoder = encoder
        self.root = root / encoder

    def path(self, slide_id: str) -> Path:
        return self.root / f"{slide_id}.h5"

    def slide_ids(self) -> list[str]:
        """Ids of slides with a complete feature file (temporary files are ignored)."""
        if not self.root.is_dir():
            return []
        return sorted(p.stem for p in self.root.glob("*.h5") if not p.name.startswith("."))

    def __contains__(self, slide_id: str) -> bool:
        return self.path(slide_id).is_file()

    def load(self, slide_id: str, **kwargs: Any) -> SlideFeatures:
        return read_slide_features(self.path(slide_id), **kwargs)

    def write(self, sf: SlideFeatures, **kwargs: Any) -> Path:
        return write_slide_features(self.path(sf.slide_id), sf, **kwargs)
