"""Is the answer in the features? Probes that bound what a reader of the patch features can score.

No result file of its own: ``vqa_ablations.py`` runs these probes and puts their table in
its results (``vqa_ablations.md``, ``vqa_ss_fresh_3ep.md``); the commands that regenerate
those are named at the top of ``vqa_ablations.py`` and ``vqa_gpu.py``.

Every probe is fit per single-choice template on the train patients and scored on the test
patients, predicting the correct option *text* from a summary of the patches under the
record's box (the whole slide for WSI questions):

* ``linear``: logistic regression on the mean and std of the raw patch features;
* ``tissue``: a patch-level tissue classifier (logistic regression from a patch's
  features to its dominant class in the label map, fit on the train slides), its class
  probabilities averaged over the box and re-expressed as fractions of the tissue (the
  questions' unit), then boosted trees on those fractions together
  with the mean and std of the features. It is the structured reader a model could
  learn: classify patches, count them, compare with the template's bins;
* ``oracle``: boosted trees on the *true* tissue fractions of the patches under the box
  (from the label map) and the planted grade. What patch-level evidence allows at best
  with this much training data; questions whose bins are finer than a patch, or that
  need the shape of the tumour (nodule counts), stay below 1 even here.

The per-template majority answer of the train records is the blind reference.

:func:`layout_probes` reads the spatial questions the way their answers are made: a label
map with one pixel per kept patch (glass elsewhere) is measured with
:func:`slidevl.synth.spatial.measure` inside the record's box, and the layout's answer is
the probe's (the train majority where the coarse map leaves it unclear). ``layout`` takes
each patch's class from the patch tissue classifier above: what a reader of the patch
features that knows where each patch lies could answer; ``layout_true`` takes each
patch's dominant class from the label map: what patch resolution allows at best.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

PROBES = ("linear", "tissue", "oracle")


@dataclass
class _Slide:
    features: np.ndarray  # (N, D) float32
    boxes: Any  # (N, 4) int64 tensor: level-0 patch boxes, exclusive ends
    step: float  # level-0 patch edge
    fractions: np.ndarray  # (N, n_classes) true class fractions of each patch
    grade: int
    class_area: np.ndarray  # (n_classes,) level-0 px² of each class on the whole slide
    mpp: float
    tissue_proba: np.ndarray | None = None  # (N, n_classes) from the patch classifier

    def under(self, bbox: Any) -> np.ndarray:
        """Mask of the patches a connector reads for ``bbox`` (every patch when None or none intersect)."""
        from slidevl.slidellm.model import boxes_intersecting

        inside = np.zeros(len(self.features), bool)
        if bbox is not None:
            inside[boxes_intersecting(self.boxes, bbox).numpy()] = True
        return inside if inside.any() else np.ones(len(self.features), bool)


def _load_slides(job: Path, cohort: Path, slide_ids: set[str]) -> dict[str, _Slide]:
    import torch

    from slidevl.features.store import FeatureStore
    from slidevl.slidellm.model import patch_step_level0
    from slidevl.synth.truth import class_fractions, load_truth

    store, truth = FeatureStore(job), load_truth(cohort)
    out = {}
    for sid in sorted(slide_ids):
        sf, st = store.load(sid, load=("patch",)), truth.slides[sid]
        step, coords = patch_step_level0(sf), torch.as_tensor(np.asarray(sf.patch_coords), dtype=torch.int64)
        boxes = torch.cat([coords, coords + round(step)], dim=1)  # as the connector sees them
        labels = st.labels()
        fractions = np.stack([class_fractions(labels, box, st.label_downsample) for box in boxes.tolist()])
        area = np.bincount(labels.ravel(), minlength=fractions.shape[1])[: fractions.shape[1]] * st.label_downsample ** 2
        out[sid] = _Slide(np.asarray(sf.patch_features, np.float32), boxes, step, fractions, st.grade, area, st.mpp)
    return out


def class_coverage(slides: dict[str, _Slide]) -> dict[str, float]:
    """Share of each tissue class's area (label map) that lies in a patch the feature job kept.

    A class the tissue mask misses cannot be read from the features by any model.
    """
    from slidevl.synth.classes import CLASSES, TISSUE_CLASSES

    kept = sum(s.fractions.sum(0) * s.step ** 2 for s in slides.values())
    total = sum(s.class_area for s in slides.values())
    return {CLASSES[c]: round(float(min(kept[c] / total[c], 1.0)), 4) for c in TISSUE_CLASSES if total[c] > 0}


def _fit_tissue_classifier(slides: dict[str, _Slide], train_ids: set[str]) -> float:
    """Fit the patch classifier on the train slides, fill every slide's probabilities; return test accuracy."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.concatenate([slides[s].features for s in sorted(train_ids)])
    y = np.concatenate([slides[s].fractions.argmax(1) for s in sorted(train_ids)])
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=3000)).fit(x, y)
    n_classes = slides[next(iter(slides))].fractions.shape[1]
    hits = []
    for sid, s in slides.items():
        proba = np.zeros((len(s.features), n_classes))
        proba[:, clf.classes_] = clf.predict_proba(s.features)
        s.tissue_proba = proba
        if sid not in train_ids:
            hits.append(proba.argmax(1) == s.fractions.argmax(1))
    return float(np.concatenate(hits).mean()) if hits else float("nan")


def _of_tissue(fractions: np.ndarray) -> np.ndarray:
    """Class fractions (background first) as fractions of the tissue, as the questions state them."""
    tissue = fractions[1:]
    return tissue / max(float(tissue.sum()), 1e-9)


def _summaries(slides: dict[str, _Slide]) -> dict[str, Callable[[Any], np.ndarray]]:
    def linear(r: Any) -> np.ndarray:
        f = slides[r.slide].features[slides[r.slide].under(r.bbox)]
        return np.concatenate([f.mean(0), f.std(0)])

    def tissue(r: Any) -> np.ndarray:
        s = slides[r.slide]
        assert s.tissue_proba is not None
        return np.concatenate([_of_tissue(s.tissue_proba[s.under(r.bbox)].mean(0)), linear(r)])

    def oracle(r: Any) -> np.ndarray:
        s = slides[r.slide]
        return np.concatenate([_of_tissue(s.fractions[s.under(r.bbox)].mean(0)), [s.grade]])

    return {"linear": linear, "tissue": tissue, "oracle": oracle}


def _classifier(probe: str) -> Any:
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if probe == "linear":
        return make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    return HistGradientBoostingClassifier(max_depth=3, max_iter=100, random_state=0)


def _target(record: Any) -> str:
    """The correct option's text of a single-choice record: what the probes predict."""
    from slidevl.qa.records import OPTION_LETTERS

    return record.options[OPTION_LETTERS.index(record.answer)]


def template_key(record: Any) -> str:
    """``level/template`` of a record: the unit the probes are fit and reported on."""
    return f"{record.level}/{record.meta.get('template', record.category)}"


def probe_features(job: Path, qa: Path, cohort: Path) -> dict[str, Any]:
    """Accuracy of every probe (and the majority answer) per level, per template and overall."""
    from slidevl.qa.records import read_records

    splits = {side: [r for r in read_records(qa / f"{side}.jsonl") if r.format == "single"] for side in ("train", "test")}
    train_ids = {r.slide for r in splits["train"]}
    slides = _load_slides(job, cohort, train_ids | {r.slide for r in splits["test"]})
    patch_accuracy = _fit_tissue_classifier(slides, train_ids)
    summaries = _summaries(slides)

    groups: dict[tuple[str, str], dict[str, list[Any]]] = defaultdict(lambda: {"train": [], "test": []})
    for side, records in splits.items():
        for r in records:
            groups[(r.level, template_key(r))][side].append(r)
    hits: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for (level, template), group in sorted(groups.items()):
        train, test = group["train"], group["test"]
        if not train or not test:
            continue
        y_train, y_test = [_target(r) for r in train], np.array([_target(r) for r in test])
        top = Counter(y_train).most_common(1)[0][0]
        predictions = {"majority": np.array([top] * len(test))}
        for probe in PROBES:
            if len(set(y_train)) < 2:
                predictions[probe] = predictions["majority"]
                continue
            clf = _classifier(probe).fit(np.stack([summaries[probe](r) for r in train]), y_train)
            predictions[probe] = clf.predict(np.stack([summaries[probe](r) for r in test]))
        for name, pred in predictions.items():
            for key in (level, template, "all"):
                hits[key][name] += (pred == y_test).astype(float).tolist()
    return {
        "patch_tissue_accuracy": round(patch_accuracy, 4),
        "class_coverage": class_coverage(slides),
        "by_key": {key: {"n": len(v["majority"]), **{name: round(float(np.mean(h)), 4) for name, h in v.items()}}
                   for key, v in hits.items()},
    }


def _patch_map(s: _Slide, classes: np.ndarray) -> np.ndarray:
    """A label map with one pixel per patch lattice cell: ``classes`` where a patch was kept, glass elsewhere."""
    from slidevl.synth.classes import BACKGROUND

    cells = (s.boxes[:, :2].numpy() // round(s.step)).astype(int)
    labels = np.full((cells[:, 1].max() + 1, cells[:, 0].max() + 1), BACKGROUND, np.uint8)
    labels[cells[:, 1], cells[:, 0]] = classes
    return labels


def layout_probes(job: Path, qa: Path, cohort: Path) -> dict[str, Any]:
    """Accuracy of the ``layout`` and ``layout_true`` readers on the spatial single-choice records, per template."""
    from slidevl.qa.records import read_records
    from slidevl.synth.spatial import measure
    from slidevl.vqa.templates import spatial_answer

    splits = {side: [r for r in read_records(qa / f"{side}.jsonl") if r.category == "spatial" and r.format == "single"]
              for side in ("train", "test")}
    train_ids = {r.slide for r in splits["train"]}
    slides = _load_slides(job, cohort, train_ids | {r.slide for r in splits["test"]})
    _fit_tissue_classifier(slides, train_ids)
    assert all(s.tissue_proba is not None for s in slides.values())
    maps = {name: {sid: _patch_map(s, pick(s)) for sid, s in slides.items()} for name, pick in
            (("layout", lambda s: s.tissue_proba.argmax(1)), ("layout_true", lambda s: s.fractions.argmax(1)))}

    best: dict[str, str] = {}  # each template's most common train answer
    for (key, text), _ in Counter((template_key(r), _target(r)) for r in splits["train"]).most_common():
        best.setdefault(key, text)
    hits: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in splits["test"]:
        s, key = slides[r.slide], template_key(r)
        box = r.bbox or (0, 0, *(np.array(maps["layout"][r.slide].shape[::-1]) * round(s.step)))
        for name, by_slide in maps.items():
            answer = spatial_answer(measure(by_slide[r.slide], box, round(s.step), s.mpp), r.meta["template"])
            guess = answer if answer in r.options else best.get(key)
            for k in (key, "all"):
                hits[k][name].append(float(guess == _target(r)))
    return {key: {"n": len(v["layout"]), **{name: round(float(np.mean(h)), 4) for name, h in v.items()}}
            for key, v in hits.items()}


def render_probes(probe: dict[str, Any], fmt: Callable[[Any], str]) -> list[str]:
    """Markdown lines: the probes per level, then per template."""
    lines = [
        "",
        ("Is the answer in the features? Probes fit per single-choice template on the train patients and scored on the "
        "test patients (see `benchmarks/vqa_probes.py`): `linear` is logistic regression on the mean/std of the raw "
        "patch features under the box; `tissue` is boosted trees on the box-averaged output of a patch tissue "
        f"classifier (patch accuracy on test slides {fmt(probe['patch_tissue_accuracy'])}) plus those mean/std; "
        "`oracle` is boosted trees on the true tissue fractions of the patches and the planted grade. Share of each "
        "class's area inside the kept patches: "
        + ", ".join(f"{name} {fmt(v)}" for name, v in probe.get("class_coverage", {}).items()) + "."),
        "",
        "| level / template | n | majority | linear | tissue | oracle |",
        "|---|---|---|---|---|---|",
    ]
    by_key = probe["by_key"]
    order = [k for k in ("WSI", "ROI", "patch", "all") if k in by_key] + sorted(k for k in by_key if "/" in k)
    for key in order:
        row = by_key[key]
        name = f"**{key}**" if "/" not in key else key
        lines.append(f"| {name} | {row['n']} | " + " | ".join(fmt(row.get(p)) for p in ("majority", *PROBES)) + " |")
    return lines
