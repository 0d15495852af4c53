"""Paired comparison of two survival models over the same validation folds.

Two models cross-validated on the same splits are scored on the same patients fold by
fold, so their C-indices are paired: the fold (and the seed) is shared noise that a
comparison of two means would count twice. A claim such as "HiLa beats ABMIL" is
tested on the fold-wise differences: their mean, a percentile bootstrap interval over
the pairs, and a two-sided Wilcoxon signed-rank p (no normality assumed; with 15
pairs its smallest possible p is about 6e-5).

:func:`compare_runs` pairs run folders by (seed, fold); a fold whose C-index is
undefined in either run drops out of the pairs and is counted.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from slidevl.errors import InputError


def paired_comparison(a: Sequence[float | None], b: Sequence[float | None], *, n_boot: int = 10_000,
                      seed: int = 0) -> dict[str, Any]:
    """Mean of ``a - b`` over the pairs where both are defined, its 95% bootstrap CI and Wilcoxon p."""
    from scipy.stats import wilcoxon

    if len(a) != len(b):
        raise InputError(f"paired comparison needs as many scores on each side, got {len(a)} and {len(b)}")
    kept = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    if len(kept) < 2:
        raise InputError(f"paired comparison needs at least 2 pairs with both scores defined, got {len(kept)}")
    diff = np.array([x - y for x, y in kept], dtype=float)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(n_boot, len(diff)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    # All-zero differences carry no evidence either way; scipy refuses them.
    p = 1.0 if not diff.any() else float(wilcoxon(diff, zero_method="zsplit").pvalue)
    return {
        "effect": float(diff.mean()),
        "ci95": [float(low), float(high)],
        "p": p,
        "n_pairs": len(diff),
        "n_dropped": len(a) - len(diff),
        "wins": int((diff > 0).sum()),
        "sd_diff": float(diff.std(ddof=1)),
    }


def fold_scores(summary: dict[str, Any]) -> dict[tuple[int, int], float | None]:
    """``{(seed, fold): C-index}`` of one run's ``summary.json`` (None where undefined)."""
    return {(int(summary["seed"]), int(row["fold"])): row["c_index"] for row in summary["folds"]}


def _load(run: Path) -> tuple[dict[str, Any], dict[int, frozenset[str]]]:
    """A finished run's summary and the validation patients of each of its folds."""
    import pandas as pd

    run = Path(run)
    path, oof = run / "summary.json", run / "oof_risks.csv"
    if not path.is_file() or not oof.is_file():
        raise InputError(f"{run}: no summary.json and oof_risks.csv; pass the folder of a finished `slidevl survival cv` run")
    frame = pd.read_csv(oof, dtype={"patient_id": str})
    return json.loads(path.read_text()), {int(f): frozenset(g["patient_id"]) for f, g in frame.groupby("fold")}


def compare_runs(a_runs: Sequence[str | Path], b_runs: Sequence[str | Path], **kwargs: Any) -> dict[str, Any]:
    """Paired comparison of two sets of run folders (one per seed), paired by (seed, fold).

    A pair is only a pair if both runs scored the same validation patients: that is
    checked fold by fold, so runs made on other splits are refused rather than paired.
    """
    sides: list[dict[tuple[int, int], tuple[float | None, frozenset[str], Path]]] = [{}, {}]
    for runs, side in zip((a_runs, b_runs), sides):
        for run in runs:
            summary, patients = _load(Path(run))
            for key, score in fold_scores(summary).items():
                side[key] = (score, patients.get(key[1], frozenset()), Path(run))
    a_side, b_side = sides
    keys = sorted(set(a_side) & set(b_side))
    if not keys:
        raise InputError("no (seed, fold) is shared by both sides; cross-validate both models with the same --seed values")
    for key in keys:
        if a_side[key][1] != b_side[key][1]:
            raise InputError(f"fold {key[1]} of seed {key[0]} scores other patients in {a_side[key][2]} than in {b_side[key][2]}; "
                             "cross-validate both models on one clinical table with the same --splits")
    return {"pairs": [list(k) for k in keys],
            **paired_comparison([a_side[k][0] for k in keys], [b_side[k][0] for k in keys], **kwargs)}
