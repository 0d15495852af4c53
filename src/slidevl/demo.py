"""``slidevl demo``: the main job on the embedded default, a synthetic demo cohort.

It renders a cohort with planted ground truth, turns its slides into a feature store,
cross-validates HiLa against ABMIL, builds a hierarchical QA set from the planted truth,
trains the slide VQA model on the training patients and scores it on the held-out ones,
and prints where everything is and how to look at it. Every step is resumable: a
second run reuses what the first one finished.
"""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

#: The demo's topo-pack encoder: 2 layers, 256 wide, keep the demo in minutes on a CPU; the
#: paper's 6 x 512 is the default of `slidevl slidellm pretrain` and of the benchmarks.
DEMO_ENCODER = {"d_model": 256, "n_layers": 2, "n_heads": 4, "ffn_dim": 1024}
#: The VQA recipe's settings at demo size (``recipes/demo.yaml``): everything not named here,
#: the connector first, is the best measured recipe's default (``recipes/vqa.yaml``).
DEMO_RECIPE = {"mae_steps": 40, "moco_steps": 20, "stage1_epochs": 2, "stage2_epochs": 1, "encoder": DEMO_ENCODER}


def _cohort_ready(cohort_dir: Path) -> bool:
    return (cohort_dir / "truth.json").is_file() and (cohort_dir / "clinical.csv").is_file()


def demo_command(
    out: Path = typer.Option(Path("demo"), "--out", help="Folder for the cohort, the job and the runs."),
    patients: int = typer.Option(30, "--patients", min=20, help="Patients in the synthetic cohort (>= 20, so each of the 5 folds has events)."),
    slide_px: int = typer.Option(20000, "--slide-px", help="Level-0 width of each synthetic slide (0.5 µm/px)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the cohort and of every model."),
    epochs: int = typer.Option(20, "--epochs", help="Training epochs of the survival models."),
    grad_accum: int = typer.Option(
        1, "--grad-accum", min=1,
        help="Patients per optimizer step of the survival models. The paper's 32 suits cohorts of hundreds; "
             "with 24 training patients it would leave one step per epoch.",
    ),
    vqa: bool = typer.Option(True, "--vqa/--no-vqa", help="Also build the QA set and train and score the slide VQA model."),
) -> None:
    """Synthetic cohort → features → survival CV → slide VQA, with every output path printed."""
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
        config = CVConfig(features=job_dir, clinical=cohort_dir / "clinical.csv", splits=cohort_dir / "splits",
                          out=runs_dir / model, model=model, epochs=epochs, seed=seed, grad_accum=grad_accum)
        # resume: a finished run is reused, an interrupted one continues from its finished folds.
        summaries.append(run_cv(config, console=console, resume=True))
        timings[f"survival cv: {model}"] = time.perf_counter() - start
    print_cv_table(summaries, console=console, title="Demo cohort: 5-fold cross-validation (final epoch)")

    vqa_paths = _vqa_steps(cohort_dir, job_dir, out / "qa", runs_dir / "vqa", seed, console, timings) if vqa else {}

    table = Table(title="Where things are", show_header=False)
    table.add_row("slides, clinical.csv, splits/, truth.json", str(cohort_dir))
    table.add_row("feature store", str(report.feature_dir))
    table.add_row("tissue GeoJSON / QC pictures", f"{job_dir / 'tissue'}  /  {job_dir / 'qc'}")
    table.add_row("manifest / summary", f"{report.manifest}  /  {report.summary}")
    for model in ("abmil", "hila"):
        table.add_row(f"{model} run (summary.json, km.png)", str(runs_dir / model))
    for name, path in vqa_paths.items():
        table.add_row(name, str(path))
    console.print(table)

    steps = Table(title="Timings")
    steps.add_column("step")
    steps.add_column("seconds", justify="right")
    for step, seconds in timings.items():
        steps.add_row(step, f"{seconds:.1f}")
    console.print(steps)
    serve = f".venv/bin/slidevl serve {job_dir} --survival-run {runs_dir / 'hila'}"
    if vqa_paths:
        serve += f" --rois {vqa_paths['QA ROIs']} --vqa-checkpoint {vqa_paths['VQA checkpoint']}"
    console.print(f"Look at it:  [bold]{serve}[/]", soft_wrap=True)


def _vqa_steps(cohort_dir: Path, job_dir: Path, qa_dir: Path, run_dir: Path, seed: int, console: Console,
               timings: dict[str, float]) -> dict[str, Path]:
    """QA set from the planted truth → VQA training → answers and scores on held-out patients."""
    from slidevl.qa.records import read_records
    from slidevl.slidellm.ask import SlideAssistant
    from slidevl.slidellm.recipe import RecipeSizes, train_vqa
    from slidevl.vqa.build import build_qa
    from slidevl.vqa.evaluate import evaluate, report_table
    from slidevl.vqa.predict import predict_records

    start = time.perf_counter()
    if (qa_dir / "test.jsonl").is_file():
        console.print(f"[dim]QA set already in {qa_dir}, reusing it[/]")
    else:
        build_qa(cohort_dir, job_dir, qa_dir, console=console)
    timings["VQA: build QA"] = time.perf_counter() - start

    start = time.perf_counter()
    trained = train_vqa(job_dir, qa_dir, run_dir, RecipeSizes(**DEMO_RECIPE, seed=seed))
    timings["VQA: pretrain + tune"] = time.perf_counter() - start

    start = time.perf_counter()
    assistant = SlideAssistant(trained.stage2, cache_root=run_dir / "ask_cache")
    predictions = predict_records(assistant, qa_dir / "test.jsonl", run_dir / "predictions.jsonl", job=job_dir,
                                  console=console)
    report = evaluate(predictions.path, qa_dir / "test.jsonl", out=run_dir / "metrics.json")
    timings["VQA: answer + score test set"] = time.perf_counter() - start
    console.print(report_table(report))

    record = next((r for r in read_records(qa_dir / "test.jsonl") if r.level == "WSI" and r.format == "caption"), None)
    if record is not None:
        answer = assistant.conversation(assistant.open_slide(record.slide, job=job_dir)).ask(record.question)
        console.print(f"[bold]slidevl ask {record.slide}[/] \"{record.question}\"\n  model: {answer}\n  truth: {record.answer}",
                      markup=True, highlight=False)
    return {
        "QA train/test.jsonl, summary.json": qa_dir,
        "QA ROIs": qa_dir / "rois",
        "VQA checkpoint": trained.stage2,
        "VQA predictions / metrics": run_dir / "metrics.json",
    }
