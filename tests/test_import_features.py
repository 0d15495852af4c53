"""Importing CLAM and TRIDENT patch-feature files into the feature store."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from slidevl.features.cli import app
from slidevl.features.importer import import_features
from slidevl.features.store import FeatureStore

runner = CliRunner()


def _lattice(n_cols: int, n_rows: int, step: int, origin: tuple[int, int]) -> np.ndarray:
    cols, rows = np.meshgrid(np.arange(n_cols), np.arange(n_rows))
    return np.stack([origin[0] + cols.ravel() * step, origin[1] + rows.ravel() * step], axis=1)


def write_clam(path: Path, coords: np.ndarray, dim: int = 8, attrs: dict | None = None, seed: int = 0) -> np.ndarray:
    """CLAM layout: root 'features' and 'coords', geometry attrs on 'coords'."""
    features = np.random.default_rng(seed).normal(size=(len(coords), dim)).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=features)
        ds = f.create_dataset("coords", data=coords.astype(np.int64))
        for key, value in (attrs or {}).items():
            ds.attrs[key] = value
    return features


def test_clam_file_with_contour_offset(tmp_path):
    # CLAM grids start at each contour's corner, not at (0, 0): offsets of 37/53 px.
    coords = _lattice(20, 6, 256, (37, 53))
    features = write_clam(tmp_path / "clam" / "s1.h5", coords, attrs={"patch_size": 256, "patch_level": 0})
    [result] = import_features(tmp_path / "clam", tmp_path / "job", "clam", mpp=0.5)
    assert result.status == "ok" and result.n_patches == 120
    sf = FeatureStore(tmp_path / "job", "clam").load("s1")
    assert sf.attrs["import_format"] == "clam" and sf.attrs["imported_from"].endswith("s1.h5")
    assert sf.attrs["patch_size_level0"] == 256.0 and sf.attrs["mpp"] == 0.5 and sf.attrs["mpp_source"] == "option"
    assert sf.attrs["source_attrs"]["patch_level"] == 0
    assert sf.pack_features is None and sf.global_feature is None
    assert np.isnan(sf.patch_tissue).all()
    # Every source row is kept, with its own coordinates, now in grid (row-major) order.
    order = np.lexsort((coords[:, 0], coords[:, 1]))
    assert np.array_equal(sf.patch_coords, coords[order])
    np.testing.assert_allclose(sf.patch_features, features[order], atol=1e-2)
    assert len(np.unique(sf.patch_grid, axis=0)) == 120
    # Regions are 16 x 16 cells: columns 0..15 and 16..20 -> 2 regions; pooled means.
    assert sf.region_grid.tolist() == [[0, 0], [1, 0]]
    for r in range(2):
        np.testing.assert_allclose(sf.region_features[r], sf.patch_features[sf.patch_region == r].mean(0), atol=1e-2)
    assert np.array_equal(sf.pack_grid[sf.patch_pack], sf.patch_grid // 3)


def test_clam_patch_level_uses_downsample(tmp_path):
    coords = _lattice(4, 4, 1024, (0, 0))
    write_clam(tmp_path / "s.h5", coords, attrs={"patch_size": 256, "patch_level": 1, "downsample": np.array([4.0, 4.0])})
    [result] = import_features(tmp_path / "s.h5", tmp_path / "job", "clam", mpp=0.25)
    assert result.status == "ok"
    attrs = FeatureStore(tmp_path / "job").load("s").attrs
    assert attrs["patch_size_level0"] == 1024.0 and attrs["target_mpp"] == 1.0


def test_trident_file_names_the_encoder_from_its_folder(tmp_path):
    src = tmp_path / "20x_256px_0px_overlap" / "features_uni_v1" / "slide.h5"
    coords = _lattice(5, 5, 512, (0, 0))
    features = np.ones((25, 4), np.float32)
    src.parent.mkdir(parents=True)
    with h5py.File(src, "w") as f:
        f.create_dataset("features", data=features)
        ds = f.create_dataset("coords", data=coords)
        ds.attrs.update({"patch_size": 256, "patch_size_level0": 512, "overlap": 0, "target_magnification": 20})
    [result] = import_features(src, tmp_path / "job", "trident", mpp=0.25)
    assert result.status == "ok" and result.output == tmp_path / "job" / "features" / "uni_v1" / "slide.h5"
    sf = FeatureStore(tmp_path / "job", "uni_v1").load("slide")
    assert sf.attrs["import_format"] == "trident" and sf.attrs["patch_size_level0_source"] == "attr patch_size_level0"
    assert sf.attrs["target_mpp"] == 0.5


def test_missing_attrs_need_explicit_options(tmp_path):
    coords = _lattice(3, 3, 448, (0, 0))
    write_clam(tmp_path / "bare.h5", coords)
    [fail] = import_features(tmp_path / "bare.h5", tmp_path / "job", "clam", mpp=0.5)
    assert fail.status == "failed" and "--patch-px" in fail.error
    write_clam(tmp_path / "half.h5", coords, attrs={"patch_size": 224, "patch_level": 2})
    [fail] = import_features(tmp_path / "half.h5", tmp_path / "job", "clam", mpp=0.5)
    assert fail.status == "failed" and "--patch-size-level0" in fail.error
    [ok] = import_features(tmp_path / "bare.h5", tmp_path / "job", "clam", mpp=0.5, patch_size_level0=448, patch_px=224)
    assert ok.status == "ok"


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda f: f.create_dataset("features", data=np.zeros((3, 4))), "no root-level dataset"),
        (lambda f: (f.create_dataset("features", data=np.zeros((3, 4))), f.create_dataset("coords", data=np.zeros((2, 2)))), "misaligned"),
        (lambda f: (f.create_dataset("features", data=np.zeros((3, 4))), f.create_dataset("coords", data=np.zeros((3, 3)))), "must be (N, 2)"),
    ],
)
def test_bad_files_fail_clearly(tmp_path, build, message):
    with h5py.File(tmp_path / "bad.h5", "w") as f:
        build(f)
    [result] = import_features(tmp_path / "bad.h5", tmp_path / "job", "clam", mpp=0.5, patch_size_level0=256, patch_px=256)
    assert result.status == "failed" and message in result.error and "bad.h5" in result.error
    assert not (tmp_path / "job" / "features" / "clam" / "bad.h5").exists()


def test_wrong_patch_size_and_overlap_are_rejected(tmp_path):
    coords = _lattice(4, 4, 256, (0, 0))
    write_clam(tmp_path / "s.h5", coords, attrs={"patch_size": 512, "patch_level": 0})
    [result] = import_features(tmp_path / "s.h5", tmp_path / "job", "clam", mpp=0.5)
    assert result.status == "failed" and "more than one patch" in result.error
    write_clam(tmp_path / "o.h5", coords, attrs={"patch_size": 256, "patch_size_level0": 256, "overlap": 64})
    [result] = import_features(tmp_path / "o.h5", tmp_path / "job", "trident", mpp=0.5)
    assert result.status == "failed" and "overlap" in result.error


def test_import_cli_exit_codes(tmp_path):
    write_clam(tmp_path / "src" / "a.h5", _lattice(3, 3, 256, (0, 0)), attrs={"patch_size": 256, "patch_level": 0})
    out = tmp_path / "job"
    ok = runner.invoke(app, ["features", "import", str(tmp_path / "src"), "--format", "clam", "--out", str(out), "--mpp", "0.5"])
    assert ok.exit_code == 0, ok.output
    assert "ok a: 9 patches" in ok.output
    again = runner.invoke(app, ["features", "import", str(tmp_path / "src"), "--format", "clam", "--out", str(out), "--mpp", "0.5"])
    assert again.exit_code == 0 and "skipped" in again.output
    other = runner.invoke(app, ["features", "import", str(tmp_path / "src"), "--format", "clam", "--out", str(out), "--mpp", "0.25"])
    assert other.exit_code == 0 and "ok a" in other.output  # new settings: imported again, not skipped
    assert FeatureStore(out, "clam").load("a").attrs["mpp"] == 0.25
    no_mpp = runner.invoke(app, ["features", "import", str(tmp_path / "src"), "--format", "clam", "--out", str(out)])
    assert no_mpp.exit_code == 2 and "--mpp" in no_mpp.output
    (tmp_path / "src" / "b.h5").write_bytes(b"not hdf5")
    mixed = runner.invoke(app, ["features", "import", str(tmp_path / "src"), "--format", "clam", "--out", str(out),
                                "--mpp", "0.5", "--overwrite"])
    assert mixed.exit_code == 1 and "not a readable HDF5 file" in mixed.output
    empty = tmp_path / "empty"
    empty.mkdir()
    none = runner.invoke(app, ["features", "import", str(empty), "--format", "clam", "--out", str(out), "--mpp", "0.5"])
    assert none.exit_code == 2 and "no .h5 feature files" in none.output
