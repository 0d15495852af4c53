"""The survival panel: a patient's out-of-fold risk against the cohort's Kaplan–Meier curves.

Reads the folder written by ``slidevl survival cv`` (:mod:`slidevl.survival.cv`):

* ``oof_risks.csv`` — ``patient_id, fold, risk, t, e``: each patient's risk from the
  model of the fold in which the patient was validated;
* ``summary.json`` — C-index per fold (mean ± std), log-rank test, the clinical table used;
* ``fold_k/`` — the fold checkpoints, which give the patient's survival curve through
  :func:`slidevl.survival.predict.predict_patient` (the patient's own validation fold,
  so the curve is out-of-fold like the risk);
* ``evidence/<slide>.json`` — names the patient of a slide.

A slide's patient comes from its evidence file, else from the run's clinical table
(``pathology_id → patient_id``). Risk groups are the run's own median split
(:func:`slidevl.survival.metrics.stratify`); the cohort curves are Kaplan–Meier estimates
of both groups, and the patient is placed on their group's curve at their follow-up time.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from lifelines import KaplanMeierFitter

from slidevl.serve.job import JobError, NotAvailableError, ServeJob
from slidevl.survival.metrics import stratify

REQUIRED = ("patient_id", "fold", "risk", "t", "e")


def _km(t: np.ndarray, e: np.ndarray) -> dict[str, list[float]]:
    kmf = KaplanMeierFitter().fit(t, e)
    sf = kmf.survival_function_.iloc[:, 0]
    return {"t": sf.index.to_numpy(float).round(3).tolist(), "s": sf.to_numpy(float).round(4).tolist(),
            "censor_t": np.sort(t[e == 0]).round(3).tolist()}


def _finite(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and np.isfinite(x) else None


class SurvivalRun:
    """Cached reader of one run folder; reloads when ``oof_risks.csv`` changes."""

    def __init__(self, run_dir: Path, job: ServeJob) -> None:
        self.run_dir = run_dir
        self.job = job
        self._lock = threading.Lock()
        self._mtime: float | None = None
        self._state: dict[str, Any] = {}
        self._curves: dict[str, dict[str, Any]] = {}

    # -- loading ----------------------------------------------------------------------------
    def _load(self) -> dict[str, Any]:
        oof = self.run_dir / "oof_risks.csv"
        if not oof.is_file():
            raise NotAvailableError(f"{oof} not found; the survival run has not written out-of-fold risks yet")
        mtime = oof.stat().st_mtime
        with self._lock:
            if mtime == self._mtime:
                return self._state
        try:
            df = pd.read_csv(oof, dtype={"patient_id": str})
        except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
            raise JobError(f"{oof}: unreadable CSV ({exc}); re-run `slidevl survival cv`") from exc
        missing = [c for c in REQUIRED if c not in df.columns]
        if missing:
            raise JobError(f"{oof}: missing columns {missing}; expected {list(REQUIRED)} as `slidevl survival cv` writes")
        summary = self._read_summary()
        state = {"df": df.set_index("patient_id", drop=False), "summary": summary,
                 "cohort": self._cohort(df), "clinical": self._clinical(summary)}
        with self._lock:
            self._mtime, self._state, self._curves = mtime, state, {}
        return state

    def _read_summary(self) -> dict[str, Any]:
        path = self.run_dir / "summary.json"
        if not path.is_file():
            return {}
        try:
            summary = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise JobError(f"{path}: invalid JSON ({exc}); re-run `slidevl survival cv`") from exc
        if not isinstance(summary, dict):
            raise JobError(f"{path}: expected a JSON object; re-run `slidevl survival cv`")
        return summary

    def _clinical(self, summary: dict[str, Any]) -> pd.DataFrame | None:
        """The run's clinical table (``pathology_id, patient_id``) if it can still be found."""
        cohort = summary.get("cohort")
        name = cohort.get("clinical") if isinstance(cohort, dict) else None
        if not isinstance(name, str) or not name:
            return None
        path = Path(name)
        # The run recorded the path as given on its command line: try where it may have been relative to.
        for candidate in ([path] if path.is_absolute() else [Path.cwd() / path, self.run_dir / path, self.run_dir.parent / path]):
            if candidate.is_file():
                try:
                    table = pd.read_csv(candidate, dtype={"pathology_id": str, "patient_id": str})
                except (OSError, pd.errors.ParserError, UnicodeDecodeError):
                    return None
                if {"pathology_id", "patient_id"} <= set(table.columns):
                    return table[["pathology_id", "patient_id"]]
        return None

    @staticmethod
    def _cohort(df: pd.DataFrame) -> dict[str, Any]:
        risk, t, e = df["risk"].to_numpy(float), df["t"].to_numpy(float), df["e"].to_numpy(int)
        strat = stratify(t, e, risk)
        cohort: dict[str, Any] = {"n": int(len(df)), "threshold": strat.threshold, "risks": np.sort(risk).round(4).tolist(),
                                  "km": {}, "logrank_p": _finite(strat.p_value)}
        for name, mask in (("high", strat.high), ("low", ~strat.high)):
            if mask.any():
                cohort["km"][name] = _km(t[mask], e[mask])
        return cohort

    # -- per slide --------------------------------------------------------------------------
    def _patient_of(self, slide_id: str, clinical: pd.DataFrame | None) -> str | None:
        if self.job.file_for(slide_id, "evidence") is not None:
            pid = self.job.read_json(slide_id, "evidence").get("patient_id")
            if isinstance(pid, str) and pid:
                return pid
        if clinical is not None:
            rows = clinical[clinical["pathology_id"] == slide_id]
            if len(rows):
                return str(rows["patient_id"].iloc[0])
        return None

    def _curve(self, slide_id: str, patient_id: str, fold: int, clinical: pd.DataFrame | None) -> dict[str, Any]:
        """The patient's survival curve from their validation fold's checkpoint (cached)."""
        with self._lock:
            hit = self._curves.get(slide_id)
        if hit is not None:
            return hit
        checkpoint = self.run_dir / f"fold_{fold}"
        slides = [slide_id]
        if clinical is not None:
            slides = clinical.loc[clinical["patient_id"] == patient_id, "pathology_id"].tolist() or slides
        paths = [p for p in (self._feature_path(s) for s in slides) if p is not None]
        if not checkpoint.is_dir():
            out: dict[str, Any] = {"curve": None, "curve_note": f"no fold_{fold} checkpoint in the run folder"}
        elif not paths:
            out = {"curve": None, "curve_note": "the patient's slides have no feature files in this job"}
        else:
            from slidevl.errors import CheckpointError
            from slidevl.survival.predict import PredictInputError, predict_patient

            try:
                pred = predict_patient(checkpoint, paths)
            except (CheckpointError, PredictInputError, OSError, KeyError, ValueError, RuntimeError) as exc:
                out = {"curve": None, "curve_note": f"fold_{fold} model could not predict ({type(exc).__name__}: {exc})"}
            else:
                out = {"curve": {"t": [float(x) for x in pred["bin_edges_months"]], "s": [1.0] + [float(s) for s in pred["survival"]],
                                 "risk": pred["risk"], "slides": pred["slides"], "checkpoint": f"fold_{fold}"},
                       "curve_note": None}
        with self._lock:
            self._curves[slide_id] = out
        return out

    def _feature_path(self, slide_id: str) -> Path | None:
        try:
            return self.job.file_for(slide_id, "features")
        except KeyError:  # a slide of the patient that this job does not hold
            return None

    def summary(self) -> dict[str, Any]:
        return self._load()["summary"]

    def for_slide(self, slide_id: str) -> dict[str, Any]:
        state = self._load()
        df, summary, cohort, clinical = state["df"], state["summary"], state["cohort"], state["clinical"]
        patient_id = self._patient_of(slide_id, clinical)
        if patient_id is None:
            raise NotAvailableError(f"slide {slide_id}: its patient is unknown to the survival run "
                                    "(no evidence file naming it and no clinical table row)")
        if patient_id not in df.index:
            raise NotAvailableError(f"patient {patient_id} (slide {slide_id}) has no out-of-fold risk in the survival run")
        row = df.loc[patient_id]
        if isinstance(row, pd.DataFrame):
            row = row.iloc[0]
        risk = float(row["risk"])
        group = "high" if risk > cohort["threshold"] else "low"
        patient: dict[str, Any] = {
            "patient_id": patient_id, "risk": risk, "group": group,
            "percentile": float((np.asarray(cohort["risks"]) <= risk).mean() * 100),
            "e": int(row["e"]), "t": float(row["t"]), "fold": int(row["fold"]),
        }
        patient.update(self._curve(slide_id, patient_id, int(row["fold"]), clinical))
        km = cohort["km"].get(group)
        if km is not None:
            idx = int(np.searchsorted(km["t"], patient["t"], side="right")) - 1
            patient["km_s"] = km["s"][max(idx, 0)]
        c_index = summary.get("c_index") if isinstance(summary.get("c_index"), dict) else {}
        brief = {
            "model": summary.get("model"), "variant": summary.get("variant"),
            "c_index_mean": _finite(c_index.get("mean")), "c_index_std": _finite(c_index.get("std")),
            "folds": len(c_index.get("folds", [])) or None, "logrank_p": _finite(summary.get("logrank_p")),
        }
        return {"summary": brief, "patient": patient, "cohort": cohort}
