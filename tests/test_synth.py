"""Synthetic cohort: slides OpenSlide can open, valid tables, consistent truth, signal."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import openslide
import pandas as pd
import pytest
import tifffile
from PIL import Image
from typer.testing import CliRunner

from slidevl.errors import InputError
from slidevl.splits import read_splits
from slidevl.synth import CLASSES, class_fractions, load_truth, make_cohort
from slidevl.synth import tiff as synth_tiff
from slidevl.synth.classes import FAT, LYMPHOCYTES, NECROSIS, STROMA, TUMOUR
from slidevl.synth.cli import app
from slidevl.synth.layout import make_layout
from slidevl.synth.model import Morphology, sample_patients
from slidevl.synth.textures import clear_texture_cache, texture_bank
from slidevl.synth.tiff import pyramid_dims

# Small banks keep the suite fast; the pixels are otherwise produced exactly as by
# the default configuration.
KW = dict(n_patients=6, seed=3, slide_px=2048, texture_px=1024, progress=False)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cohort")
    make_cohort(out, **KW)
    return out


def test_openslide_opens_every_slide_with_mpp_and_levels(cohort: Path) -> None:
    truth = load_truth(cohort)
    layouts = set()
    for sid, s in truth.slides.items():
        assert s.path == cohort / "slides" / f"{sid}.tiff"
        with openslide.OpenSlide(str(s.path)) as slide:
            vendor = slide.properties["openslide.vendor"]
            assert vendor == {"aperio": "aperio", "generic": "generic-tiff"}[s.layout]
            assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.5)
            assert float(slide.properties["openslide.mpp-y"]) == pytest.approx(0.5)
            assert slide.dimensions == (s.width, s.height)
            assert list(slide.level_dimensions) == pyramid_dims(s.width, s.height)
            expected = [4.0**k for k in range(slide.level_count)]
            assert slide.level_downsamples == pytest.approx(expected, rel=0.01)
            if max(s.width, s.height) > 4 * 512:
                assert slide.level_count >= 3  # 1, 4, 16
        layouts.add(s.layout)
    assert layouts == {"aperio", "generic"}
    assert sum(s.layout == "generic" for s in truth.slides.values()) >= 1


def test_pixels_follow_the_label_map(cohort: Path) -> None:
    """Rendered colour per true class: tiles are in place and classes look distinct."""
    truth = load_truth(cohort)
    sums = np.zeros((len(CLASSES), 3))
    counts = np.zeros(len(CLASSES))
    for s in truth.slides.values():
        with openslide.OpenSlide(str(s.path)) as slide:
            w, h = slide.level_dimensions[1]
            img = np.asarray(slide.read_region((0, 0), 1, (w, h)).convert("RGB"), dtype=np.float64)
        # Level 1 is 4x reduced, labels 16x: one label pixel per 4x4 level-1 block.
        lab = s.labels()
        blocks = img.reshape(h // 4, 4, w // 4, 4, 3).mean(axis=(1, 3))
        for c in range(len(CLASSES)):
            m = lab == c
            sums[c] += blocks[m].sum(0)
            counts[c] += m.sum()
    mean = sums / np.maximum(counts, 1)[:, None]
    brightness = mean.mean(1)
    assert brightness[0] > 225  # glass
    assert counts[TUMOUR] > 0 and counts[STROMA] > 0
    # Nuclei make tumour and lymphocytes darker and bluer than collagen; fat is mostly
    # empty, necrosis pale.
    assert brightness[LYMPHOCYTES] < brightness[STROMA] - 10
    assert brightness[TUMOUR] < brightness[STROMA]
    assert mean[STROMA, 0] > mean[STROMA, 1] + 40  # pink: red well above green
    if counts[FAT]:
        assert brightness[FAT] > brightness[STROMA] + 30
    if counts[NECROSIS]:
        assert brightness[NECROSIS] > brightness[TUMOUR]


def test_clinical_table(cohort: Path) -> None:
    clinical = pd.read_csv(cohort / "clinical.csv")
    truth = load_truth(cohort)
    assert list(clinical.columns) == ["pathology_id", "patient_id", "e", "t"]
    assert set(clinical["e"]) <= {0, 1} and clinical["e"].dtype.kind == "i"
    assert (clinical["t"] > 0).all() and (clinical["t"] <= 240).all()
    assert np.allclose(clinical["t"], clinical["t"].round(2))
    assert sorted(clinical["pathology_id"]) == sorted(p.stem for p in (cohort / "slides").glob("*.tiff"))
    assert clinical["pathology_id"].is_unique
    for pid, rows in clinical.groupby("patient_id"):
        p = truth.patients[pid]
        assert sorted(rows["pathology_id"]) == sorted(p.slides)
        assert (rows["e"] == p.e).all() and np.allclose(rows["t"], p.t)
    assert clinical["patient_id"].nunique() == KW["n_patients"]


def test_splits_are_patient_level_and_stratified(cohort: Path) -> None:
    clinical = pd.read_csv(cohort / "clinical.csv")
    patients = clinical.drop_duplicates("patient_id").set_index("patient_id")["e"]
    splits = read_splits(cohort / "splits")
    assert len(splits) == 5
    val_all = []
    for train, val in splits:
        assert not set(train) & set(val)
        assert set(train) | set(val) == set(patients.index)
        val_all += val
    assert sorted(val_all) == sorted(patients.index)
    per_fold_events = [int(patients[val].sum()) for _, val in splits]
    assert max(per_fold_events) - min(per_fold_events) <= 1
    header = (cohort / "splits" / "splits_0.csv").read_text().splitlines()[0]
    assert header == ",train,val"


def test_truth_regions_match_label_map(cohort: Path) -> None:
    truth = load_truth(cohort)
    raw = json.loads((cohort / "truth.json").read_text())
    assert raw["class_index"] == {c: i for i, c in enumerate(CLASSES)}
    for s in truth.slides.values():
        lab = s.labels()
        assert lab.shape == (s.height // 16, s.width // 16)
        assert np.asarray(Image.open(s.label_path)).dtype == np.uint8
        assert len(s.regions) == -(-s.width // 4096) * -(-s.height // 4096)
        for r in s.regions:
            fr = np.array([r.fractions[c] for c in CLASSES])
            assert fr.sum() == pytest.approx(1.0, abs=1e-3)
            assert fr == pytest.approx(class_fractions(lab, r.bbox), abs=1e-4)
            counts = np.bincount(
                lab[r.bbox[1] // 16 : r.bbox[3] // 16, r.bbox[0] // 16 : r.bbox[2] // 16].ravel(), minlength=6
            )
            assert fr == pytest.approx(counts / counts.sum(), abs=1e-4)
            tissue = {c: v for c, v in r.fractions.items() if c != "background"}
            if sum(tissue.values()) > 0:
                assert r.dominant == max(tissue, key=tissue.get)
        # The point lookup agrees with the map.
        y, x = np.argwhere(lab == lab.max())[0]
        assert s.class_at(x * 16 + 5, y * 16 + 9) == CLASSES[lab.max()]
        for n in s.nodules:
            assert 0 <= n.x < s.width and 0 <= n.y < s.height and n.radius > 0


def test_same_seed_same_files(cohort: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    make_cohort(again, **KW)
    assert (again / "clinical.csv").read_bytes() == (cohort / "clinical.csv").read_bytes()
    for name in ("splits/splits_0.csv", "labels/SYN-0000-01.png"):
        assert (again / name).read_bytes() == (cohort / name).read_bytes()
    for tif in sorted((cohort / "slides").glob("*.tiff"))[:2]:
        a = tifffile.imread(tif)
        b = tifffile.imread(again / "slides" / tif.name)
        assert np.array_equal(a, b)
    other = tmp_path / "other"
    make_cohort(other, **{**KW, "seed": 4})
    assert (other / "clinical.csv").read_bytes() != (cohort / "clinical.csv").read_bytes()


def test_texture_banks_are_deterministic_and_grade_shows() -> None:
    clear_texture_cache()
    first = texture_bank(FAT, 0, 11, 512)
    clear_texture_cache()
    assert np.array_equal(first.h, texture_bank(FAT, 0, 11, 512).h)
    # Nuclear area (dense hematoxylin) grows with grade.
    area = [(texture_bank(TUMOUR, g, 11, 512).h > 100).mean() for g in (1, 2, 3)]
    assert area[0] < area[1] < area[2]


def test_layout_realises_planted_morphology() -> None:
    m = Morphology(
        grade=2,
        tumour_fraction=0.45,
        necrosis_fraction=0.2,
        lymphocyte_infiltration=0.8,
        fat_fraction=0.15,
        nodule_weights=(0.5, 0.3, 0.2),
    )
    layout = make_layout(16384, 14336, m, np.random.default_rng(0))
    lab = layout.label_map()
    c = np.bincount(lab.ravel(), minlength=6).astype(float)
    tissue = c[1:].sum()
    bed = c[TUMOUR] + c[NECROSIS]
    assert bed / tissue == pytest.approx(0.45, abs=0.06)
    assert c[NECROSIS] / bed == pytest.approx(0.2, abs=0.06)
    assert c[FAT] / (tissue - bed) == pytest.approx(0.15, abs=0.06)
    assert c[LYMPHOCYTES] / (tissue - bed) == pytest.approx(0.03 + 0.32 * 0.8, abs=0.06)
    assert len(layout.nodules) == 3
    # Nodule centres lie in the tumour bed.
    for n in layout.nodules:
        assert lab[int(n.y) // 16, int(n.x) // 16] in (TUMOUR, NECROSIS)


def test_oracle_risk_separates_outcomes() -> None:
    from sksurv.metrics import concordance_index_censored

    ps = sample_patients(1500, seed=9, censor_rate=0.65)
    e = np.array([p.e for p in ps], bool)
    t = np.array([p.t for p in ps])
    r = np.array([p.risk for p in ps])
    c = concordance_index_censored(e, t, r)[0]
    assert 0.72 < c < 0.9
    assert 0.58 < 1 - e.mean() < 0.72
    assert 20 < np.median(t) < 60 and t.max() <= 240
    # Patient i does not depend on the cohort size.
    assert sample_patients(5, seed=9)[4] == ps[4]


def test_class_fractions_weights_partial_pixels() -> None:
    lab = np.array([[1, 2], [3, 4]], np.uint8)
    fr = class_fractions(lab, [8, 8, 24, 24])
    assert fr[1:5] == pytest.approx([0.25] * 4)
    fr = class_fractions(lab, [0, 0, 24, 16])  # 16 px of class 1, 8 px of class 2
    assert fr[1] == pytest.approx(2 / 3) and fr[2] == pytest.approx(1 / 3)
    assert class_fractions(lab, [-100, -100, 1000, 1000])[1:5] == pytest.approx([0.25] * 4)
    with pytest.raises(ValueError, match="outside the slide"):
        class_fractions(lab, [40, 40, 50, 50])
    with pytest.raises(ValueError, match="is empty"):
        class_fractions(lab, [10, 10, 10, 20])


def test_level_buffer_on_disk_when_large(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The memory-mapped level-1 path writes the same pyramid and cleans up."""
    monkeypatch.setattr(synth_tiff, "_RAM_LIMIT_BYTES", 0)
    yy, xx = np.mgrid[0:1200, 0:2100]
    # Smooth and asymmetric, so JPEG is nearly exact and misplaced tiles would show.
    img = np.stack([xx * 255 // 2100, yy * 255 // 1200, (np.sin(xx / 90.0) * np.cos(yy / 70.0) * 100 + 128)], -1)
    img = img.astype(np.uint8)
    path = tmp_path / "x.tiff"
    dims = synth_tiff.write_slide_tiff(path, lambda y, x, h, w: img[y : y + h, x : x + w], 2100, 1200, "generic")
    assert [p.name for p in tmp_path.iterdir()] == ["x.tiff"]
    with openslide.OpenSlide(str(path)) as slide:
        assert list(slide.level_dimensions) == dims
        lvl1 = np.asarray(slide.read_region((0, 0), 1, dims[1]).convert("RGB"), dtype=float)
    expected = img.reshape(300, 4, 525, 4, 3).mean(axis=(1, 3))
    assert np.abs(lvl1 - expected).mean() < 2  # JPEG error only


def test_load_truth_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="slidevl synth cohort"):
        load_truth(tmp_path)
    (tmp_path / "truth.json").write_text('{"schema": "other"}')
    with pytest.raises(InputError, match="schema"):
        load_truth(tmp_path)


def test_cli_cohort_and_refuses_to_clobber(tmp_path: Path) -> None:
    out = tmp_path / "c"
    args = ["cohort", str(out), "--patients", "3", "--folds", "2", "--slide-px", "1024", "--seed", "5", "-q"]
    args += ["--texture-px", "512"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and "generic TIFF" in result.output
    assert len(read_splits(out / "splits")) == 2
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "--overwrite" in again.output
    assert CliRunner().invoke(app, args + ["--overwrite"]).exit_code == 0
