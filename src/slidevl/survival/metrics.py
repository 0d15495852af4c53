"""Evaluation: concordance index, risk-group stratification, Kaplan–Meier plot."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slidevl.atomic import atomic_path


def c_index(t: np.ndarray, e: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's C on continuous time via scikit-survival (higher risk = earlier event).

    Raises ``ValueError`` when the set has no comparable pair (check with
    :func:`has_comparable_pair`): the C-index is then undefined.
    """
    from sksurv.exceptions import NoComparablePairException
    from sksurv.metrics import concordance_index_censored

    e = np.asarray(e).astype(bool)
    if not e.any():
        raise ValueError("the C-index needs at least one uncensored patient in the evaluated set")
    undefined = "no comparable pair (an event before another patient's time) in the evaluated set: the C-index is undefined"
    try:
        # Events tied in time only form pairs that scikit-survival weighs 0/0: NaN, not a score.
        with np.errstate(invalid="ignore", divide="ignore"):
            score = float(concordance_index_censored(e, np.asarray(t, dtype=float), np.asarray(risk, dtype=float))[0])
    except NoComparablePairException as exc:
        raise ValueError(undefined) from exc
    if not np.isfinite(score):
        raise ValueError(undefined)
    return score


def has_comparable_pair(t: np.ndarray, e: np.ndarray) -> bool:
    """Whether the C-index of these patients is defined, by scikit-survival's own pairing rule."""
    try:
        c_index(t, e, np.zeros(len(np.asarray(t))))
    except ValueError:
        return False
    return True


@dataclass
class RiskStratification:
    """High/low risk groups split at the median risk, with the log-rank test between them."""

    threshold: float
    high: np.ndarray  # bool mask
    p_value: float
    test_statistic: float

    def as_dict(self) -> dict:
        return {
            "threshold": self.threshold,
            "n_high": int(self.high.sum()),
            "n_low": int((~self.high).sum()),
            "logrank_p": self.p_value,
            "logrank_statistic": self.test_statistic,
        }


def stratify(t: np.ndarray, e: np.ndarray, risk: np.ndarray) -> RiskStratification:
    """Split at the median risk (strictly above = high) and run lifelines' log-rank test."""
    from lifelines.statistics import logrank_test

    t, e, risk = (np.asarray(x, dtype=float) for x in (t, e, risk))
    threshold = float(np.median(risk))
    high = risk > threshold
    if high.all() or not high.any():
        # All risks tied: there is no second group to compare.
        return RiskStratification(threshold, high, float("nan"), float("nan"))
    res = logrank_test(t[high], t[~high], event_observed_A=e[high], event_observed_B=e[~high])
    return RiskStratification(threshold, high, float(res.p_value), float(res.test_statistic))


def plot_km(path: str | Path, t: np.ndarray, e: np.ndarray, strat: RiskStratification, title: str = "") -> Path:
    """Draw Kaplan–Meier curves of the two risk groups with the log-rank p-value as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from lifelines import KaplanMeierFitter

    t, e = np.asarray(t, dtype=float), np.asarray(e, dtype=float)
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    for name, mask, color in (("low risk", ~strat.high, "tab:blue"), ("high risk", strat.high, "tab:red")):
        if mask.any():
            kmf = KaplanMeierFitter(label=f"{name} (n={int(mask.sum())})")
            kmf.fit(t[mask], event_observed=e[mask])
            kmf.plot_survival_function(ax=ax, ci_show=True, color=color, show_censors=True)
    ax.set_xlabel("time (months)")
    ax.set_ylabel("survival probability")
    ax.set_ylim(0, 1.05)
    p = strat.p_value
    ax.set_title(f"{title}  log-rank p = {p:.2e}" if np.isfinite(p) else f"{title}  log-rank p = n/a")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
