"""Discrete-time survival labels: the MCAT / Patch-GCN binning rule.

Rule (patient-level table):
1. interior edges are the quantiles of the *uncensored* patients' times (linear
   interpolation, as ``pd.qcut``);
2. the outer edges become min(t) - 1e-6 and max(t) + 1e-6 over *all* patients;
3. a time falls in bin ``i`` when ``edges[i] <= t < edges[i+1]`` (``right=False``).

``mode="all"`` fits the edges on the whole cohort, the published convention.
``mode="train"`` fits them on the training fold only, so no validation time leaks into
the labels; validation times outside the training range are clipped to the first/last bin.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

from slidevl.survival.cohort import CohortError

BinsMode = Literal["all", "train"]
EDGE_EPS = 1e-6


@dataclass(frozen=True)
class SurvivalBins:
    """Bin edges in months (``n_bins + 1`` values) and how they were fitted."""

    edges: tuple[float, ...]
    mode: str = "all"

    @property
    def n_bins(self) -> int:
        return len(self.edges) - 1

    def assign(self, t: np.ndarray) -> np.ndarray:
        """Bin index of each time, ``right=False``; out-of-range times clip to the end bins."""
        inner = np.asarray(self.edges[1:-1], dtype=float)
        return np.digitize(np.asarray(t, dtype=float), inner, right=False).astype(np.int64)

    def as_dict(self) -> dict:
        return {"edges": list(self.edges), "mode": self.mode, "n_bins": self.n_bins}


def fit_bins(t: np.ndarray, e: np.ndarray, n_bins: int = 4, *, mode: str = "all") -> SurvivalBins:
    """Fit the MCAT bin edges on patient-level times ``t`` and event indicators ``e``.

    Raises :class:`CohortError` when there are too few distinct uncensored times to
    make ``n_bins`` distinct quantile edges (``pd.qcut`` refuses the same case).
    """
    t = np.asarray(t, dtype=float)
    e = np.asarray(e).astype(bool)
    if n_bins < 1:
        raise CohortError(f"--n-bins must be >= 1, got {n_bins}")
    uncensored = t[e]
    if len(uncensored) < n_bins:
        raise CohortError(
            f"only {len(uncensored)} uncensored patient(s) for {n_bins} bins; use fewer bins (--n-bins) or a larger cohort"
        )
    edges = np.quantile(uncensored, np.linspace(0.0, 1.0, n_bins + 1))
    edges[0] = t.min() - EDGE_EPS
    edges[-1] = t.max() + EDGE_EPS
    if np.any(np.diff(edges) <= 0):
        raise CohortError(
            f"survival bin edges are not distinct ({np.round(edges, 4).tolist()}): too many tied uncensored times for "
            f"{n_bins} bins; use fewer bins (--n-bins)"
        )
    return SurvivalBins(edges=tuple(float(x) for x in edges), mode=mode)


def bin_summary(bins: SurvivalBins, t: np.ndarray, e: np.ndarray) -> dict:
    """Edges plus per-bin patient, event and censored counts (JSON-ready)."""
    labels = bins.assign(t)
    e = np.asarray(e).astype(bool)
    counts = np.bincount(labels, minlength=bins.n_bins)
    events = np.bincount(labels[e], minlength=bins.n_bins)
    return {
        **asdict(bins),
        "edges": list(bins.edges),
        "n_bins": bins.n_bins,
        "n_patients": int(len(labels)),
        "counts": counts.tolist(),
        "events": events.tolist(),
        "censored": (counts - events).tolist(),
    }
