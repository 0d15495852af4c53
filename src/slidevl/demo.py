"""``slidevl demo``: the main job on the embedded default, a synthetic demo cohort.

It renders a cohort with planted ground truth, turns its slides into a feature store,
cross-validates HiLa against ABMIL, and prints where everything is and how to look at
it. Every step is resumable: a second run reuses what the first one finished.
"""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table


def _cohort_ready(cohort_dir: Path) -> bool:
    return (cohort_dir / "truth.json").is_file() and (cohort_dir / "clinical.csv").is_file()


def demo_command(
    out: Path = typer.Option(Path("demo"), "--out", help="Folder for the cohort, the job and the runs."),
    patients: int = typer.Option(30, "--patients", help="Patients in the synthetic cohort."),
    slide_px: int = typer.Option(20000, "--slide-px", help="Level-0 width of each synthetic slide (0.5 µm/px)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the cohort and of every model."),
    epochs: int = typer.Option(20, "--epochs", help="Training epochs of the survival models."),
) -> None:
    """Synthetic cohort → features → survival cross-validation, with every output path printed."""
    # Imported here so that `slidevl --help` does not pay for torch and friends.
    from slidevl.features.config import PreprocessConfig
    from slidevl.features.pipeline import preprocess
    from slidevl.survival.cv import CVConfig, run_cv
    from slidevl.survival.report import print_cv_table
    from slidevl.synth.cohort import make_cohort

    console = Console()
    timings: dict[str, float] = {}
    cohort_dir, job_dir, runs_dir = out / "cohort", out / "job", out / "runs"

    start = time.perf_counter()
    if _cohort_ready(cohort_dir):
        console.print(f"[dim]cohort already in {cohort_dir}, reusing it[/]")
    else:
        make_cohort(cohort_dir, n_patients=patients, seed=seed, slide_px=slide_px, overwrite=cohort_dir.exists())
    timings["synthetic cohort"] = time.perf_counter() - start

    start = time.perf_counter()
    report = preprocess(cohort_dir / "slides", job_dir, PreprocessConfig(), console=console)
    timings["preprocess"] = time.perf_counter() - start
    if report.exit_code:
        console.print(f"[red]{report.n_failed} slide(s) failed to preprocess[/]; see {report.summary}")
        raise typer.Exit(report.exit_code)

    summaries = []
    for model in ("abmil", "hila"):
        start = time.perf_counter()
        summaries.append(
            run_cv(
                CVConfig(
                    features=job_dir, clinical=cohort_dir / "clinical.csv", splits=cohort_dir / "splits",
                    out=runs_dir / model, model=model, epochs=epochs, seed=seed,
                ),
                console=console,
            )
        )
        timings[f"survival cv: {model}"] = time.perf_counter() - start
    print_cv_table(summaries, console=console, title="Demo cohort: 5-fold cross-validation (final epoch)")

    table = Table(title="Where things are", show_header=False)
    table.add_row("slides, clinical.csv, splits/, truth.json", str(cohort_dir))
    table.add_row("feature store", str(report.feature_dir))
    table.add_row("tissue GeoJSON / QC pictures", f"{job_dir / 'tissue'}  /  {job_dir / 'qc'}")
    table.add_row("manifest / summary", f"{report.manifest}  /  {report.summary}")
    for model in ("abmil", "hila"):
        table.add_row(f"{model} run (summary.json, km.png)", str(runs_dir / model))
    console.print(table)

    steps = Table(title="Timings")
    steps.add_column("step")
    steps.add_column("seconds", justify="right")
    for step, seconds in timings.items():
        steps.add_row(step, f"{seconds:.1f}")
    console.print(steps)
    console.print(f"Look at it:  [bold].venv/bin/slidevl serve {job_dir} --survival-run {runs_dir / 'hila'}[/]")
