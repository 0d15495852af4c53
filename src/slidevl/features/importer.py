"""Import patch features produced by CLAM or TRIDENT into the slidevl feature store.

Both tools write one HDF5 file per slide with root-level ``features`` (N, D) and
``coords`` (N, 2) (level-0 x, y of each patch's top-left corner). Patch geometry lives
in attributes, mostly on ``coords``: CLAM records ``patch_size`` and ``patch_level``
(and ``downsample`` of that level), TRIDENT records ``patch_size`` and
``patch_size_level0``. Neither records the mpp, so it must be given.

The patch size at level 0 defines the lattice: each patch is assigned to the nearest
global grid cell (``round(x / size)``), regions are pooled with the region encoder, and
the pack table is laid out without pack or global features (they need the pixels).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import h5py
import numpy as np

from slidevl import __version__
from slidevl.errors import InputError
from slidevl.features.hierarchy import build_hierarchy, encode_regions
from slidevl.features.jobs import UsageError, normalise, now_iso
from slidevl.features.store import FeatureStore, FeatureStoreError, SlideFeatures, read_slide_attrs
from slidevl.tiling.grid import GridSpec, SlideGrid

FORMATS = ("clam", "trident")


class ImportFormatError(InputError):
    """A source file lacks the datasets or attributes the import needs."""


@dataclass
class ImportResult:
    slide_id: str
    source: Path
    status: str  # ok | failed | skipped
    error: str | None = None
    n_patches: int | None = None
    output: Path | None = None


def _attr_value(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_source(path: Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """``features`` (N, D), ``coords`` (N, 2) and merged attributes (root, features, coords)."""
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise ImportFormatError(f"{path}: not a readable HDF5 file ({exc})") from exc
    with f:
        missing = [name for name in ("features", "coords") if not isinstance(f.get(name), h5py.Dataset)]
        if missing:
            raise ImportFormatError(
                f"{path}: no root-level dataset(s) {', '.join(missing)} (found {sorted(f.keys())}); "
                "expected a CLAM or TRIDENT patch-feature file with 'features' and 'coords'"
            )
        features = f["features"][()]
        coords = f["coords"][()]
        attrs: dict[str, Any] = {}
        for obj in (f, f["features"], f["coords"]):  # later ones win: coords carries the geometry
            attrs.update({k: _attr_value(v) for k, v in obj.attrs.items()})
    if features.ndim == 3 and features.shape[0] == 1:
        features = features[0]  # some exports keep a leading batch axis
    if features.ndim != 2:
        raise ImportFormatError(f"{path}: 'features' must be 2-D (N, D), got shape {features.shape}")
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ImportFormatError(f"{path}: 'coords' must be (N, 2), got shape {coords.shape}")
    if len(features) != len(coords):
        raise ImportFormatError(
            f"{path}: 'features' has {len(features)} rows but 'coords' has {len(coords)}; the file is misaligned"
        )
    if len(features) == 0:
        raise ImportFormatError(f"{path}: the file holds no patches")
    if not np.all(np.isfinite(coords)) or np.any(coords < 0):
        raise ImportFormatError(f"{path}: 'coords' holds negative or non-finite values")
    return np.asarray(features, dtype=np.float32), np.rint(coords).astype(np.int64), attrs


def patch_geometry(path: Path, fmt: str, attrs: Mapping[str, Any], patch_size_level0: float | None,
                   patch_px: int | None) -> tuple[float, int, str]:
    """(patch size in level-0 px, patch size in px at extraction, where the size came from)."""
    if fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    overlap = attrs.get("overlap")
    if overlap not in (None, 0, 0.0):
        raise ImportFormatError(f"{path}: patches overlap by {overlap} px; only non-overlapping patch grids can be imported")
    px = patch_px if patch_px is not None else attrs.get("patch_size")
    if px is None:
        raise ImportFormatError(f"{path}: no 'patch_size' attribute; pass --patch-px (patch edge in pixels at extraction)")
    px = int(px)
    if patch_size_level0 is not None:
        return float(patch_size_level0), px, "option"
    if attrs.get("patch_size_level0") is not None:
        return float(attrs["patch_size_level0"]), px, "attr patch_size_level0"
    level = attrs.get("patch_level")
    if level is not None and int(level) == 0:
        return float(px), px, "attr patch_size at patch_level 0"
    downsample = attrs.get("downsample")
    if level is not None and downsample is not None:
        ds = np.atleast_1d(np.asarray(downsample, dtype=np.float64))
        if ds.size and np.allclose(ds, ds[0], rtol=1e-3):
            return float(px * ds[0]), px, f"attr patch_size x downsample {ds[0]:g} (patch_level {int(level)})"
    raise ImportFormatError(
        f"{path}: cannot tell the patch size at level 0 (attributes: {sorted(attrs)}); pass --patch-size-level0"
    )


def default_encoder_name(path: Path, fmt: str) -> str:
    """TRIDENT writes features into ``features_<encoder>/``; otherwise name it after the format."""
    parent = path.parent.name
    return parent[len("features_"):] if parent.startswith("features_") and len(parent) > 9 else fmt


def import_file(path: Path, out: Path, fmt: str, *, mpp: float, mpp_source: str, patch_size_level0: float | None = None,
                patch_px: int | None = None, encoder: str | None = None, region_encoder: Any = None,
                region_patches: int = 16, pack_size: int = 3, float16: bool = True, overwrite: bool = False) -> ImportResult:
    """Import one CLAM/TRIDENT file (see module docstring); errors end up in the result."""
    path = Path(path)
    slide_id = path.stem
    encoder = encoder or default_encoder_name(path, fmt)
    store = FeatureStore(out, encoder)
    target = store.path(slide_id)
    request = normalise({
        "source": str(path.resolve()),
        "source_bytes": path.stat().st_size,
        "format": fmt,
        "mpp": mpp,
        "patch_size_level0_option": patch_size_level0,
        "patch_px_option": patch_px,
        "region_encoder": getattr(region_encoder, "name", None),
        "region_encoder_revision": getattr(region_encoder, "revision", None),
        "region_patches": region_patches,
        "pack_size": pack_size,
        "float16": float16,
    })
    if not overwrite and _imported_with(target, request):
        return ImportResult(slide_id, path, "skipped", error="already imported with these settings (use --overwrite)",
                            output=target)
    try:
        features, coords, src_attrs = read_source(path)
        step, px, size_source = patch_geometry(path, fmt, src_attrs, patch_size_level0, patch_px)
        if not step > 0:
            raise ImportFormatError(f"{path}: patch size at level 0 must be > 0, got {step}")
        spec = GridSpec(target_mpp=step * mpp / px, patch_px=px, region_patches=region_patches, pack_size=pack_size)
        width = int(np.ceil(coords[:, 0].max() + step))
        height = int(np.ceil(coords[:, 1].max() + step))
        grid = SlideGrid(spec, width, height, mpp)
        cells = np.floor(coords / grid.patch_step + 0.5).astype(np.int64)
        offset = np.abs(coords - grid.patch_edges(cells)).max()
        _, first, counts = np.unique(cells, axis=0, return_index=True, return_counts=True)
        if counts.max() > 1:
            dup = cells[first[np.argmax(counts)]]
            raise ImportFormatError(
                f"{path}: {int((counts > 1).sum())} grid cells hold more than one patch (e.g. cell {dup.tolist()}); "
                f"the patch size at level 0 ({step:g}, from {size_source}) does not match the coordinates' spacing; "
                "check --patch-size-level0"
            )
        # The store lists patches row-major on the grid.
        order = np.lexsort((cells[:, 0], cells[:, 1]))
        features, coords, cells = features[order], coords[order], cells[order]
        hier = build_hierarchy(grid, cells)
        region_features = None
        if region_encoder is not None:
            region_features = encode_regions(features, hier, region_patches, region_encoder)
        attrs = {
            "created": now_iso(),
            "slidevl_version": __version__,
            "imported_from": str(path.resolve()),
            "import_fingerprint": request,
            "import_format": fmt,
            "source_attrs": {k: v for k, v in src_attrs.items() if isinstance(v, (str, int, float, bool, list))},
            "encoder": encoder,
            "encoder_revision": "unknown (imported)",
            "feature_dim": int(features.shape[1]),
            "region_encoder": getattr(region_encoder, "name", None),
            "region_encoder_revision": getattr(region_encoder, "revision", None),
            "target_mpp": spec.target_mpp,
            "mpp": mpp,
            "mpp_source": mpp_source,
            "patch_px": px,
            "patch_size_level0": float(step),
            "patch_size_level0_source": size_source,
            "region_size_level0": float(grid.region_step),
            "pack_size_level0": float(grid.pack_step),
            "pack_size": pack_size,
            "region_patches": region_patches,
            "grid_spec": spec.to_dict(),
            "grid_max_offset_px": int(offset),
            "slide_extent_from_coords": [width, height],
        }
        sf = SlideFeatures(
            slide_id=slide_id,
            patch_features=features,
            patch_coords=coords,
            patch_grid=cells,
            patch_region=hier.region_index,
            patch_pack=hier.pack_index,
            # Imported files carry no tissue fractions: NaN marks "not measured".
            patch_tissue=np.full(len(features), np.nan, dtype=np.float32),
            region_features=region_features,
            region_coords=hier.region_coords,
            region_grid=hier.region_grid,
            pack_coords=hier.pack_coords,
            pack_grid=hier.pack_grid,
            attrs=attrs,
        )
        store.write(sf, float16=float16)
    except Exception as exc:  # one bad file must not stop the others
        message = str(exc) if isinstance(exc, (RuntimeError, ValueError, OSError)) else f"{type(exc).__name__}: {exc}"
        return ImportResult(slide_id, path, "failed", error=message)
    return ImportResult(slide_id, path, "ok", n_patches=len(features), output=target)


def _imported_with(target: Path, request: dict[str, Any]) -> bool:
    # Like preprocess: an existing file counts only if it came from the same source and settings.
    if not target.is_file():
        return False
    try:
        return read_slide_attrs(target).get("import_fingerprint") == request
    except (FeatureStoreError, OSError):
        return False


def discover_sources(sources: Path | str | Sequence[Path | str]) -> list[Path]:
    """``.h5`` files from files and folders, or :class:`UsageError` when there are none."""
    if isinstance(sources, (str, Path)):
        sources = [sources]
    found: list[Path] = []
    for item in map(Path, sources):
        if item.is_dir():
            found.extend(sorted(p for p in item.iterdir() if p.suffix.lower() in (".h5", ".hdf5") and p.is_file()))
        elif item.is_file():
            found.append(item)
        else:
            raise UsageError(f"{item}: no such file or folder")
    if not found:
        raise UsageError(f"no .h5 feature files found in {', '.join(map(str, sources))}")
    return found


def import_features(sources: Path | str | Sequence[Path | str], out: Path | str, fmt: str, *, mpp: float | None = None,
                    mpp_table: Mapping[str, float] | None = None, patch_size_level0: float | None = None,
                    patch_px: int | None = None, encoder: str | None = None, region_encoder: str = "mean",
                    float16: bool = True, overwrite: bool = False) -> list[ImportResult]:
    """Import every CLAM/TRIDENT file in ``sources`` into the job folder ``out``.

    The mpp comes from ``mpp_table`` (per slide id) or ``mpp`` (every file); a file with
    neither fails with a message naming both options.
    """
    if fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    from slidevl.features.encoders import get_region_encoder

    pooling = get_region_encoder(region_encoder)
    results = []
    for path in discover_sources(sources):
        sid = path.stem
        if mpp_table and sid in mpp_table:
            value, source = float(mpp_table[sid]), "csv"
        elif mpp is not None:
            value, source = float(mpp), "option"
        else:
            results.append(ImportResult(sid, path, "failed", error=f"{path}: no mpp for {sid!r}; pass --mpp or --mpp-csv"))
            continue
        results.append(
            import_file(path, Path(out), fmt, mpp=value, mpp_source=source, patch_size_level0=patch_size_level0,
                        patch_px=patch_px, encoder=encoder, region_encoder=pooling, float16=float16, overwrite=overwrite)
        )
    return results
