"""Rich tables of cross-validation results, for the CLI and ``make demo``."""

from __future__ import annotations

from typing import Iterable, Mapping

from rich.console import Console
from rich.table import Table


def _name(summary: Mapping) -> str:
    variant = summary.get("variant")
    return summary["model"] + (f" ({variant})" if variant and variant != "full" else "")


def cv_table(summaries: Mapping | Iterable[Mapping], title: str = "Survival cross-validation") -> Table:
    """One row per run: per-fold and mean ± std C-index, log-rank p, bins mode, seconds per epoch.

    An undefined fold shows ``n/a``; the mean then says over how many folds it was taken.
    """
    if isinstance(summaries, Mapping):
        summaries = [summaries]
    summaries = list(summaries)
    n_folds = max((len(s["c_index"]["folds"]) for s in summaries), default=0)
    table = Table(title=title)
    table.add_column("model")
    table.add_column("C-index (mean ± std)", justify="right")
    for k in range(n_folds):
        table.add_column(f"fold {k}", justify="right")
    table.add_column("log-rank p", justify="right")
    table.add_column("bins", justify="center")
    table.add_column("s / epoch", justify="right")
    for s in summaries:
        ci = s["c_index"]
        folds = ["n/a" if c is None else f"{c:.3f}" for c in ci["folds"]] + [""] * (n_folds - len(ci["folds"]))
        counted = ci.get("counted", len(ci["folds"]))
        mean = "undefined" if ci["mean"] is None else f"{ci['mean']:.3f} ± {ci['std']:.3f}"
        if counted < len(ci["folds"]):
            mean += f" ({counted} of {len(ci['folds'])} folds)"
        p = s.get("logrank_p")
        table.add_row(
            _name(s),
            mean,
            *folds,
            "n/a" if p is None or p != p else f"{p:.2e}",
            s.get("bins", {}).get("mode", ""),
            f"{s.get('timing', {}).get('mean_epoch_seconds', float('nan')):.2f}",
        )
    return table


def print_cv_table(summaries: Mapping | Iterable[Mapping], console: Console | None = None, title: str = "Survival cross-validation") -> None:
    """Print :func:`cv_table` to ``console`` (stdout by default)."""
    (console or Console()).print(cv_table(summaries, title))
