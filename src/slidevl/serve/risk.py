"""The survival panel: a patient's out-of-fold risk against the cohort's Kaplan–Meier curves.

Read from a survival run folder:

* ``summary.json`` — run metrics (C-index mean ± std, …), shown as they are; an optional
  ``bin_edges`` list (months) gives the time axis of per-patient survival curves and an
  optional ``risk_threshold`` splits high from low risk (default: the cohort median).
* ``oof_risks.csv`` — one row per patient: ``patient_id, risk, e, t`` plus the slides of
  the patient in ``slide_ids`` (``;``-separated) or ``pathology_id``; optional ``fold`` and
  ``surv_0 … surv_{K-1}`` (the model's survival probability at the end of each time bin).

The cohort curves are Kaplan–Meier estimates (lifelines) of the high- and low-risk groups
with a log-rank test between them; the patient is placed on their group's curve at their
own follow-up time.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from lifelines import KaplanMeierFitter
from lifelines.statistics import logrank_test

from slidevl.serve.job import JobError, NotAvailableError

REQUIRED = ("patient_id", "risk", "e", "t")


def _km(t: np.ndarray, e: np.ndarray) -> dict[str, list[float]]:
    kmf = KaplanMeierFitter().fit(t, e)
    sf = kmf.survival_function_.iloc[:, 0]
    return {"t": sf.index.to_numpy(float).round(3).tolist(), "s": sf.to_numpy(float).round(4).tolist(),
            "censor_t": np.sort(t[e == 0]).round(3).tolist()}


class SurvivalRun:
    """Cached reader of one run folder; reloads when ``oof_risks.csv`` changes."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self._lock = threading.Lock()
        self._mtime: float | None = None
        self._state: dict[str, Any] = {}

    def _load(self) -> dict[str, Any]:
        oof = self.run_dir / "oof_risks.csv"
        if not oof.is_file():
            raise NotAvailableError(f"{oof} not found; the survival run has not written out-of-fold risks yet")
        mtime = oof.stat().st_mtime
        with self._lock:
            if mtime == self._mtime:
                return self._state
        try:
            df = pd.read_csv(oof)
        except (OSError, pd.errors.ParserError, UnicodeDecodeError) as exc:
            raise JobError(f"{oof}: unreadable CSV ({exc}); re-run the survival cross-validation") from exc
        missing = [c for c in REQUIRED if c not in df.columns]
        if missing:
            raise JobError(f"{oof}: missing columns {missing}; expected {list(REQUIRED)} plus slide_ids or pathology_id")
        if "slide_ids" not in df.columns and "pathology_id" not in df.columns:
            raise JobError(f"{oof}: needs a 'slide_ids' or 'pathology_id' column to find a slide's patient")
        summary_path = self.run_dir / "summary.json"
        summary: dict[str, Any] = {}
        if summary_path.is_file():
            try:
                summary = json.loads(summary_path.read_text())
            except json.JSONDecodeError as exc:
                raise JobError(f"{summary_path}: invalid JSON ({exc}); re-run the survival cross-validation") from exc
        state = {"df": df, "summary": summary, "cohort": self._cohort(df, summary)}
        with self._lock:
            self._mtime, self._state = mtime, state
        return state

    @staticmethod
    def _cohort(df: pd.DataFrame, summary: dict[str, Any]) -> dict[str, Any]:
        risk = df["risk"].to_numpy(float)
        t = df["t"].to_numpy(float)
        e = df["e"].to_numpy(int)
        threshold = float(summary.get("risk_threshold", np.median(risk)))
        high = risk > threshold
        cohort: dict[str, Any] = {"n": int(len(df)), "threshold": threshold, "risks": np.sort(risk).round(4).tolist(),
                                  "km": {}, "logrank_p": None}
        for name, mask in (("high", high), ("low", ~high)):
            if mask.any():
                cohort["km"][name] = _km(t[mask], e[mask])
        if high.any() and (~high).any():
            cohort["logrank_p"] = float(logrank_test(t[high], t[~high], e[high], e[~high]).p_value)
        return cohort

    def _row(self, df: pd.DataFrame, slide_id: str) -> pd.Series | None:
        if "slide_ids" in df.columns:
            hit = df["slide_ids"].astype(str).str.split(";").apply(lambda ids: slide_id in [s.strip() for s in ids])
        else:
            hit = df["pathology_id"].astype(str) == slide_id
        rows = df[hit]
        return None if rows.empty else rows.iloc[0]

    def summary(self) -> dict[str, Any]:
        return self._load()["summary"]

    def for_slide(self, slide_id: str) -> dict[str, Any]:
        state = self._load()
        df, summary, cohort = state["df"], state["summary"], state["cohort"]
        row = self._row(df, slide_id)
        if row is None:
            raise NotAvailableError(f"slide {slide_id} has no out-of-fold risk in {self.run_dir / 'oof_risks.csv'}")
        risk = float(row["risk"])
        group = "high" if risk > cohort["threshold"] else "low"
        patient: dict[str, Any] = {
            "patient_id": str(row["patient_id"]), "risk": risk, "group": group,
            "percentile": float((np.asarray(cohort["risks"]) <= risk).mean() * 100),
            "e": int(row["e"]), "t": float(row["t"]),
            "fold": int(row["fold"]) if "fold" in row.index and pd.notna(row["fold"]) else None,
            "curve": None,
        }
        surv_cols = sorted((c for c in df.columns if c.startswith("surv_")), key=lambda c: int(c.split("_")[1]))
        edges = summary.get("bin_edges")
        if surv_cols and isinstance(edges, list) and len(edges) == len(surv_cols) + 1:
            patient["curve"] = {"t": [float(x) for x in edges], "s": [1.0] + [float(row[c]) for c in surv_cols]}
        km = cohort["km"].get(group)
        if km is not None:
            # Where the patient sits on their group's curve: S at their own follow-up time.
            idx = int(np.searchsorted(km["t"], patient["t"], side="right")) - 1
            patient["km_s"] = km["s"][max(idx, 0)]
        return {"summary": summary, "patient": patient, "cohort": cohort}
