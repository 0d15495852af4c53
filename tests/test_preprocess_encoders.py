"""Several tile encoders in one job folder: each keeps its own statuses, so no rerun starts over."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from slide_fixtures import write_aperio_slide
from slidevl.features import jobs
from slidevl.features.config import PreprocessConfig
from slidevl.features.jobcheck import check_job
from slidevl.features.pipeline import Encoders, load_encoders, preprocess
from slidevl.features.store import FeatureStore
from slidevl.serve.job import JobError, ServeJob
from slidevl.slide.tissue import TissueParams

CONFIG = PreprocessConfig(workers=0, batch_size=16, progress=False)
# Another encoder run with other tissue settings: its outlines must not replace the first one's.
OTHER = replace(CONFIG, tissue=TissueParams(saturation_threshold=40.0), min_tissue=0.5)
SLIDE_IDS = ("a", "b")


def _other_encoders() -> Encoders:
    """The handcrafted encoder under another name: another feature folder and fingerprint."""
    encoders = load_encoders(OTHER)
    encoders.tile.name = "handcrafted-other"
    return encoders


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("slides")
    for seed, sid in enumerate(SLIDE_IDS):
        write_aperio_slide(folder / f"{sid}.svs", 2048, 1536, seed=seed)
    return folder


def _outcomes(report) -> dict[str, str]:
    return {r.slide_id: r.status for r in report.results}


def _feature_bytes(job: Path, folder: str) -> dict[str, bytes]:
    store = FeatureStore(job, folder)
    return {sid: store.path(sid).read_bytes() for sid in SLIDE_IDS}


def test_two_encoders_in_one_job_each_rerun_skips(slides: Path, tmp_path: Path) -> None:
    job = tmp_path / "job"
    assert _outcomes(preprocess(slides, job, CONFIG)) == {"a": "ok", "b": "ok"}
    assert _outcomes(preprocess(slides, job, OTHER, encoders=_other_encoders())) == {"a": "ok", "b": "ok"}
    first, other = _feature_bytes(job, "handcrafted"), _feature_bytes(job, "handcrafted-other")

    # Each encoder's rerun finds its own slides complete, and rewrites none of the features.
    assert _outcomes(preprocess(slides, job, CONFIG)) == {"a": "skipped", "b": "skipped"}
    assert _outcomes(preprocess(slides, job, OTHER, encoders=_other_encoders())) == {"a": "skipped", "b": "skipped"}
    assert _feature_bytes(job, "handcrafted") == first and _feature_bytes(job, "handcrafted-other") == other

    for folder, config in (("handcrafted", CONFIG), ("handcrafted-other", OTHER)):
        for sid in SLIDE_IDS:
            status = jobs.read_status(job, sid, folder)
            assert status is not None and status.status == "ok" and status.encoder_folder == folder
            assert jobs.status_path(job, sid, folder).is_file()
            # Each status names the outline made with its own tissue settings.
            assert status.tissue == f"tissue/{folder}/{sid}.geojson" and (job / status.tissue).is_file()
            assert status.fingerprint["tissue"] == jobs.normalise(config.tissue.to_dict())
    assert (job / "tissue/handcrafted/a.geojson").read_bytes() != (job / "tissue/handcrafted-other/a.geojson").read_bytes()

    manifest = jobs.read_manifest(job)
    assert manifest["encoders"] == ["handcrafted", "handcrafted-other"]
    assert sorted((e["slide_id"], e["encoder_folder"], e["status"]) for e in manifest["slides"]) == [
        ("a", "handcrafted", "skipped"), ("a", "handcrafted-other", "skipped"),
        ("b", "handcrafted", "skipped"), ("b", "handcrafted-other", "skipped"),
    ]
    assert manifest["configs"]["handcrafted"]["min_tissue"] == 0.25
    assert manifest["configs"]["handcrafted-other"]["min_tissue"] == 0.5
    summary = (job / jobs.SUMMARY).read_text()
    assert "| a | handcrafted-other | skipped |" in summary and "`handcrafted`, `handcrafted-other`" in summary

    report = check_job(job)
    assert report.ok and len(report.slides) == 4

    # A slide the other encoder failed on (or was interrupted on) stays complete for the first.
    failed = replace(jobs.read_status(job, "a", "handcrafted-other"), status="failed", error="out of memory")
    jobs.write_status(job, failed)
    assert _outcomes(preprocess(slides, job, CONFIG)) == {"a": "skipped", "b": "skipped"}
    assert _feature_bytes(job, "handcrafted") == first
    assert jobs.read_status(job, "a", "handcrafted-other").status == "failed"

    # The viewer shows one encoder's features, and asks which when the job holds several.
    viewer = ServeJob(job, encoder="handcrafted-other")
    assert viewer.file_for("a", "features") == (job / "features/handcrafted-other/a.h5").resolve()
    assert viewer.file_for("a", "tissue") == (job / "tissue/handcrafted-other/a.geojson").resolve()
    with pytest.raises(JobError, match="several encoders.*--encoder"):
        ServeJob(job)


def _to_older_layout(job: Path, *folders: str) -> None:
    """Rewrite a job as preprocess wrote it, running ``folders`` in turn, before statuses were kept per encoder.

    Then each run replaced the previous one's status, tissue outline and QC picture of a slide.
    """
    for folder in folders or ("handcrafted",):
        for new in sorted((job / jobs.STATUS_DIR / folder).glob("*.json")):
            record = json.loads(new.read_text())
            del record["encoder_folder"]
            sid = record["slide_id"]
            for kind, suffix in (("tissue", "geojson"), ("qc", "png")):
                (job / kind / folder / f"{sid}.{suffix}").replace(job / kind / f"{sid}.{suffix}")
                record[kind] = f"{kind}/{sid}.{suffix}"
            (job / jobs.STATUS_DIR / f"{sid}.json").write_text(json.dumps(record))
            new.unlink()
        for kind in (jobs.STATUS_DIR, "tissue", "qc"):
            (job / kind / folder).rmdir()


def test_older_layout_job_stays_complete(slides: Path, tmp_path: Path) -> None:
    job = tmp_path / "job"
    preprocess(slides, job, CONFIG)
    _to_older_layout(job)
    features = _feature_bytes(job, "handcrafted")

    assert _outcomes(preprocess(slides, job, CONFIG)) == {"a": "skipped", "b": "skipped"}
    assert _feature_bytes(job, "handcrafted") == features
    # The records moved to the encoder folder's place, and still name the older outlines.
    assert not list((job / jobs.STATUS_DIR).glob("*.json"))
    for sid in SLIDE_IDS:
        status = jobs.read_status(job, sid, "handcrafted")
        assert status.encoder_folder == "handcrafted" and status.tissue == f"tissue/{sid}.geojson"

    # Another encoder added to the older job leaves the first one complete.
    assert _outcomes(preprocess(slides, job, OTHER, encoders=_other_encoders())) == {"a": "ok", "b": "ok"}
    assert _outcomes(preprocess(slides, job, CONFIG)) == {"a": "skipped", "b": "skipped"}


def test_older_record_counts_only_for_its_own_encoder(slides: Path, tmp_path: Path) -> None:
    job = tmp_path / "job"
    preprocess(slides, job, CONFIG)
    _to_older_layout(job)
    assert jobs.read_status(job, "a", "handcrafted-other") is None
    assert jobs.read_status(job, "a", "handcrafted").output == "features/handcrafted/a.h5"
    rows = jobs.read_manifest(job)["slides"]
    jobs.rebuild_manifest(job)
    assert [jobs.row_key(r) for r in jobs.read_manifest(job)["slides"]] == [("a", "handcrafted"), ("b", "handcrafted")]
    assert len(rows) == 2


def test_older_layout_job_of_two_encoders_stays_complete(slides: Path, tmp_path: Path) -> None:
    job = tmp_path / "job"
    preprocess(slides, job, CONFIG)
    preprocess(slides, job, OTHER, encoders=_other_encoders())
    _to_older_layout(job, "handcrafted", "handcrafted-other")  # the second run's records replaced the first's
    first, other = _feature_bytes(job, "handcrafted"), _feature_bytes(job, "handcrafted-other")

    assert _outcomes(preprocess(slides, job, CONFIG)) == {"a": "skipped", "b": "skipped"}
    assert _outcomes(preprocess(slides, job, OTHER, encoders=_other_encoders())) == {"a": "skipped", "b": "skipped"}
    assert _feature_bytes(job, "handcrafted") == first and _feature_bytes(job, "handcrafted-other") == other
    for sid in SLIDE_IDS:
        adopted = jobs.read_status(job, sid, "handcrafted")
        assert adopted.output == f"features/handcrafted/{sid}.h5" and adopted.encoder == "handcrafted"
        assert adopted.n_patches == FeatureStore(job, "handcrafted").load(sid).n_patches
        # The outline left was made with the other tissue settings: not this encoder's.
        assert adopted.tissue is None and adopted.qc is None
        assert jobs.read_status(job, sid, "handcrafted-other").tissue == f"tissue/{sid}.geojson"
    assert check_job(job).ok
