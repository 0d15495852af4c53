"""Feature store round-trip, provenance attributes, schema checks and atomicity."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from slidevl.atomic import atomic_path, write_json_atomic
from slidevl.features.store import (
    SCHEMA_VERSION,
    FeatureStore,
    FeatureStoreError,
    SlideFeatures,
    read_slide_attrs,
    read_slide_features,
    write_slide_features,
)
from slidevl.tiling.grid import GridSpec, SlideGrid, index_cells


def _features(n_cols: int = 20, n_rows: int = 18, dim: int = 8, seed: int = 0) -> SlideFeatures:
    rng = np.random.default_rng(seed)
    grid = SlideGrid(GridSpec(), width=256 * n_cols, height=256 * n_rows, mpp=0.5)
    patches = grid.all_patches()
    regions, region_index = index_cells(grid.region_of(patches))
    packs, pack_index = index_cells(grid.pack_of(patches))
    return SlideFeatures(
        slide_id="S-1",
        patch_features=rng.normal(size=(len(patches), dim)).astype(np.float32),
        patch_coords=grid.patch_edges(patches),
        patch_grid=patches,
        patch_region=region_index,
        patch_pack=pack_index,
        patch_tissue=rng.uniform(size=len(patches)).astype(np.float32),
        region_features=rng.normal(size=(len(regions), dim)).astype(np.float32),
        region_coords=grid.cell_boxes(regions, 16)[:, :2],
        region_grid=regions,
        pack_features=rng.normal(size=(len(packs), dim)).astype(np.float32),
        pack_coords=grid.cell_boxes(packs, 3)[:, :2],
        pack_grid=packs,
        global_feature=rng.normal(size=dim).astype(np.float32),
        attrs={"encoder": "test", "pack_size": 3, "grid": GridSpec().to_dict(), "mpp_read": 0.5, "note": None},
    )


def test_round_trip_keeps_arrays_and_attributes(tmp_path: Path) -> None:
    sf = _features()
    path = write_slide_features(tmp_path / "S-1.h5", sf, float16=False)
    back = read_slide_features(path)
    for name in ("patch_features", "patch_coords", "patch_grid", "patch_region", "patch_pack", "region_features",
                 "pack_features", "pack_grid", "global_feature"):
        np.testing.assert_array_equal(getattr(back, name), getattr(sf, name), err_msg=name)
    assert back.attrs["schema_version"] == SCHEMA_VERSION
    assert back.attrs["grid"] == GridSpec().to_dict()
    assert back.attrs["note"] is None
    assert read_slide_attrs(path)["encoder"] == "test"
    with h5py.File(path) as f:
        # Rows are chunked in blocks, never one row per chunk.
        assert f["patch/features"].chunks[0] == min(1024, sf.n_patches)
        assert f["patch/features"].compression == "gzip"


def test_attribute_strings_round_trip_exactly(tmp_path: Path) -> None:
    texts = {"bracket": "[not json", "brace": "{x}", "word": "null", "tagged": "json:[1]", "list": [1, "a"]}
    sf = _features()
    sf.attrs.update(texts)
    back = read_slide_attrs(write_slide_features(tmp_path / "S-1.h5", sf))
    assert {k: back[k] for k in texts} == texts


def test_float16_storage_is_close(tmp_path: Path) -> None:
    sf = _features()
    back = read_slide_features(write_slide_features(tmp_path / "a.h5", sf))
    assert back.patch_features.dtype == np.float32
    np.testing.assert_allclose(back.patch_features, sf.patch_features, atol=2e-3)


def test_optional_tables_can_be_skipped(tmp_path: Path) -> None:
    sf = _features()
    back = read_slide_features(write_slide_features(tmp_path / "a.h5", sf), load=("patch",))
    assert back.pack_features is None and back.region_features is None and back.global_feature is None
    assert back.region_coords is not None  # geometry is always loaded: it is small and indexes the patches


def test_inconsistent_arrays_are_rejected_before_writing(tmp_path: Path) -> None:
    sf = _features()
    sf.patch_region = sf.patch_region + 10_000
    with pytest.raises(FeatureStoreError, match="region_index out of range"):
        write_slide_features(tmp_path / "bad.h5", sf)
    assert not list(tmp_path.iterdir())


def test_failed_rewrite_keeps_previous_file(tmp_path: Path) -> None:
    target = tmp_path / "S-1.h5"
    write_slide_features(target, _features(seed=1), float16=False)
    before = target.read_bytes()
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half written")
            raise RuntimeError("killed")
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["S-1.h5"]


def test_unreadable_and_foreign_files_name_the_file_and_fix(tmp_path: Path) -> None:
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5")
    with pytest.raises(FeatureStoreError, match="junk.h5.*re-run `slidevl preprocess`"):
        read_slide_features(junk)
    foreign = tmp_path / "clam.h5"
    with h5py.File(foreign, "w") as f:
        f["features"] = np.zeros((3, 4))
        f["coords"] = np.zeros((3, 2))
        f.attrs["schema_version"] = SCHEMA_VERSION
    with pytest.raises(FeatureStoreError, match="features import"):
        read_slide_features(foreign)
    with pytest.raises(FeatureStoreError, match="feature file not found"):
        read_slide_features(tmp_path / "missing.h5")


def test_feature_store_lists_complete_files_only(tmp_path: Path) -> None:
    store = FeatureStore(tmp_path, encoder="handcrafted")
    store.write(_features())
    (store.root / ".S-2.h5.abc.partial").write_bytes(b"")
    assert store.slide_ids() == ["S-1"]
    assert "S-1" in store and "S-2" not in store
    assert FeatureStore(tmp_path).encoder == "handcrafted"
    np.testing.assert_array_equal(store.load("S-1").patch_grid, _features().patch_grid)


def test_feature_store_needs_a_single_or_named_encoder(tmp_path: Path) -> None:
    with pytest.raises(FeatureStoreError, match="run `slidevl preprocess"):
        FeatureStore(tmp_path)
    (tmp_path / "features" / "a").mkdir(parents=True)
    (tmp_path / "features" / "b").mkdir()
    with pytest.raises(FeatureStoreError, match="pass the encoder name"):
        FeatureStore(tmp_path)


def test_write_json_atomic_handles_numpy(tmp_path: Path) -> None:
    path = write_json_atomic(tmp_path / "x" / "m.json", {"a": np.int64(3), "b": np.arange(2), "p": tmp_path})
    assert path.read_text().count("3") >= 1 and '"b": [\n' in path.read_text()
