"""Risk and survival curve of one patient from a saved fold model.

Inputs are feature files (``.h5`` in the slidevl layout), slide files, or ids of slides
in the job folder (their features, or else the slide file the job records); slides are
first run through :func:`slidevl.features.pipeline.preprocess` into a job folder with
the feature encoder the model was trained on. All inputs are one patient's bag.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from slidevl.errors import InputError
from slidevl.features.store import FeatureStore
from slidevl.survival.checkpoint import load_checkpoint
from slidevl.survival.data import BagCache, FeatureFiles
from slidevl.survival.labels import SurvivalBins
from slidevl.survival.scaling import FeatureScaler
from slidevl.survival.train import predict_bag

FEATURE_SUFFIXES = (".h5", ".hdf5")


class PredictInputError(InputError):
    """The inputs of a prediction cannot be turned into a bag."""


def _job_inputs(inputs: Sequence[Path], job: Path | None, encoder: str, slides_root: Path | None) -> list[Path]:
    """Inputs with every slide id of ``job`` replaced by its feature file, or else by its recorded slide file."""
    from slidevl.features.jobs import recorded_slide
    from slidevl.features.slidepaths import SlideFileError

    resolved = []
    for p in inputs:
        if p.exists():
            resolved.append(p)
            continue
        if job is None:
            raise PredictInputError(f"{p}: file not found (a slide id needs --job, the job folder that holds it)")
        feature = FeatureStore(job, encoder).path(str(p))
        if feature.is_file():
            resolved.append(feature)
            continue
        try:
            slide = recorded_slide(job, str(p), slides_root)
        except SlideFileError as exc:
            raise PredictInputError(f"{p} has no features in {job} and they cannot be computed: {exc}") from exc
        if slide is None:
            raise PredictInputError(f"{p}: neither a file nor a slide id of {job}")
        resolved.append(slide)
    return resolved


def _feature_paths(inputs: Sequence[Path], job: Path | None, encoder: str, slides_root: Path | None = None) -> list[Path]:
    inputs = _job_inputs(inputs, job, encoder, slides_root)
    features = [p for p in inputs if p.suffix.lower() in FEATURE_SUFFIXES]
    slides = [p for p in inputs if p.suffix.lower() not in FEATURE_SUFFIXES]
    if slides:
        if job is None:
            raise PredictInputError(
                f"{', '.join(map(str, slides))}: slide files need a job folder for their features; pass --job DIR "
                "(or give the slides' .h5 feature files)"
            )
        from slidevl.features.config import PreprocessConfig
        from slidevl.features.jobs import slide_id_of
        from slidevl.features.pipeline import preprocess

        from rich.console import Console

        # Progress to stderr: stdout carries the prediction JSON.
        report = preprocess(slides, job, PreprocessConfig(encoder=encoder), console=Console(stderr=True))
        failed = [r for r in report.results if r.status == "failed"]
        if failed:
            raise PredictInputError("preprocessing failed: " + "; ".join(f"{r.slide_id}: {r.error}" for r in failed))
        store = FeatureStore(job, encoder)
        features += [store.path(slide_id_of(p)) for p in slides]
    return features


def predict_patient(checkpoint: str | Path, inputs: Sequence[str | Path], *, job: str | Path | None = None, device: str = "cpu",
                    slides_root: str | Path | None = None) -> dict:
    """Risk (−ΣS), hazards and the survival curve over the model's bins (edges in months).

    ``inputs`` are feature files, slide files, or ids of slides in ``job``; an id without
    features is preprocessed from the file the job records (looked for first in
    ``slides_root`` when the slides moved).
    """
    model, config = load_checkpoint(checkpoint, device)
    if not inputs:
        raise PredictInputError("give at least one feature file or slide")
    paths = _feature_paths([Path(p) for p in inputs], None if job is None else Path(job), config.get("feature_encoder", "handcrafted"),
                           None if slides_root is None else Path(slides_root))
    bins = SurvivalBins(tuple(config["bins"]["edges"]), config["bins"]["mode"])
    files = FeatureFiles(paths)
    if len(files.paths) != len(paths):
        raise PredictInputError("two inputs have the same slide id (file stem); give each slide once")
    # One prediction reads each file once: no cache needed.
    bag = BagCache(files, config["region_tokens"], max_cache_bytes=0).bag("patient", list(files.paths))
    if config.get("scaler"):
        bag = FeatureScaler.from_dict(config["scaler"]).apply(bag)
    pred = predict_bag(model, bag, device)
    return {
        "checkpoint": str(checkpoint),
        "model": config["model"]["name"],
        "slides": [s.slide_id for s in bag.spans],
        "risk": pred.risk,
        "hazards": pred.hazards.tolist(),
        "survival": pred.survival.tolist(),
        "bin_edges_months": list(bins.edges),
        "bins_mode": bins.mode,
    }
