"""Per-slide evidence files for the viewer: what the model looked at.

``<run>/evidence/<slide>.json`` holds, for the final model of the fold in which the
slide was validated:

- HiLa: for every patch (row ``index`` of the slide's feature file) its level-0
  ``coords``, whether OPL ``kept`` it, the prompt it was matched to (``prompt_index``
  into the ``prompts`` table, which gives the risk level and the text) and its
  ``alignment`` score; the same for region tokens, plus the per-level prompt scores.
- ABMIL: the attention weight of every patch (summing to 1 over the patient's bag).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from slidevl.atomic import write_json_atomic
from slidevl.survival.data import PatientBag

PER_TOKEN_KEYS = ("kept", "prompt_index", "alignment", "attention")


def prompt_table(texts: tuple[tuple[str, ...], ...], labels: tuple[str, ...]) -> list[dict[str, Any]]:
    """Flat prompt index (level * max prompts + prompt) → level, label and text."""
    width = max(len(level) for level in texts)
    return [
        {"index": level * width + i, "level": level, "label": labels[level], "text": text}
        for level, level_texts in enumerate(texts)
        for i, text in enumerate(level_texts)
    ]


def _slice(table: dict[str, np.ndarray], start: int, stop: int) -> dict[str, list]:
    return {key: np.asarray(table[key])[start:stop].tolist() for key in PER_TOKEN_KEYS if key in table}


def slide_evidence(bag: PatientBag, evidence: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Split a bag's per-token evidence into one JSON-ready record per slide."""
    out = {}
    for span in bag.spans:
        record: dict[str, Any] = {}
        if "patch" in evidence:
            n = span.stop - span.start
            record["patch"] = {"index": list(range(n)), "coords": span.coords.tolist(), **_slice(evidence["patch"], span.start, span.stop)}
            if "level_scores" in evidence["patch"]:
                record["patch_level_scores"] = np.asarray(evidence["patch"]["level_scores"]).tolist()
        if "region" in evidence:
            region = _slice(evidence["region"], span.region_start, span.region_stop)
            if span.region_coords is not None:
                region["coords"] = span.region_coords.tolist()
            record["region"] = region
            record["region_level_scores"] = np.asarray(evidence["region"]["level_scores"]).tolist()
        out[span.slide_id] = record
    return out


def write_evidence(directory: str | Path, patient_id: str, records: dict[str, dict[str, Any]], meta: dict[str, Any]) -> list[Path]:
    """Write ``<directory>/<slide>.json`` for every slide's record (:func:`slide_evidence`); ``meta`` is copied into each.

    The records are plain JSON-ready data, so the process that predicted a patient can
    hand them to the one that writes.
    """
    paths = []
    for slide_id, record in records.items():
        path = Path(directory) / f"{slide_id}.json"
        write_json_atomic(path, {"slide_id": slide_id, "patient_id": patient_id, **meta, **record}, indent=None)
        paths.append(path)
    return paths
