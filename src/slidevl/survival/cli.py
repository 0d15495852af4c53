"""``slidevl survival …``: cross-validation, label bins and prediction from the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.console import Console

from slidevl.cli_config import field_option, options_from
from slidevl.cli_errors import ReportingGroup
from slidevl.ranks import is_main_process
from slidevl.survival.cohort import ClinicalColumns
from slidevl.survival.cv import CVConfig

app = typer.Typer(
    cls=ReportingGroup,
    help="Survival prediction from WSI features: HiLa and MIL baselines with honest cross-validation.",
    no_args_is_help=True,
    add_completion=False,
)
_err = Console(stderr=True)


def _columns(id_col: str, patient_col: str, time_col: str, event_col: str, event_is_censoring: bool,
             time_unit: str) -> ClinicalColumns:
    return ClinicalColumns(id_col, patient_col, time_col, event_col, event_is_censoring, time_unit)


def _parse_options(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` pairs; values are read as JSON when they parse (numbers, true/false), else kept as text."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"--option expects key=value, got {pair!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


@app.command("cv")
@options_from(CVConfig, recipe_help="YAML/JSON file of CVConfig settings (e.g. recipes/survival.yaml); options given here override it.")
def cv_command(
    config: CVConfig,
    option: List[str] = typer.Option(
        [], "--option", help="Model hyper-parameter key=value (repeatable), e.g. dim=128; added to the recipe's model_options."),
    threads: int = typer.Option(0, "--threads", help="CPU threads for torch (0: torch's default); 1 is fastest for small bags on shared machines."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the run in --out (only a run's outputs are removed)."),
    resume: bool = typer.Option(
        False, "--resume", help="Continue the run in --out from its last finished fold (an interrupted run resumes anyway)."),
) -> None:
    """Cross-validate a model; write summary.json, oof_risks.csv, km.png and fold_k/ checkpoints.

    The whole input is checked before any work starts; Ctrl-C stops after saying which
    folds finished, and the same command continues from there. Under `accelerate launch`
    it trains on several GPUs (docs/cluster.md).
    """
    from slidevl.interrupts import resumable
    from slidevl.survival.cv import run_cv
    from slidevl.survival.report import print_cv_table
    from slidevl.survival.runfolder import describe_progress

    if option:
        config = config.with_overrides({"model_options": {**config.model_options, **_parse_options(option)}})
    if threads > 0:
        import torch

        torch.set_num_threads(threads)
    with resumable(lambda: describe_progress(config.out), console=_err):
        summary = run_cv(config, show_progress=not quiet, console=_err, overwrite=overwrite, resume=resume)
    if is_main_process():
        print_cv_table(summary)
        Console().print(f"run folder: {config.out}")


@app.command("bins")
def bins_command(
    clinical: Path = typer.Option(..., "--clinical", help="CSV with one row per slide: slide id, patient id, event, time."),
    n_bins: Optional[int] = typer.Option(None, "--n-bins", help="[default: 4, fewer when the uncensored times allow fewer]"),
    id_col: str = field_option(ClinicalColumns, "id_col"),
    patient_col: str = field_option(ClinicalColumns, "patient_col"),
    time_col: str = field_option(ClinicalColumns, "time_col"),
    event_col: str = field_option(ClinicalColumns, "event_col"),
    event_is_censoring: bool = field_option(ClinicalColumns, "event_is_censoring"),
    time_unit: str = field_option(ClinicalColumns, "time_unit"),
) -> None:
    """Print the MCAT survival-bin edges (months) and per-bin patient/event counts as JSON."""
    from slidevl.survival.labels import bin_summary
    from slidevl.survival.validate import plan_bins

    columns = _columns(id_col, patient_col, time_col, event_col, event_is_censoring, time_unit)
    cohort, bins, notices = plan_bins(clinical, columns, n_bins)
    for notice in notices:
        _err.print(f"[yellow]note:[/] {notice}", highlight=False)
    patients = cohort.patients
    typer.echo(json.dumps(bin_summary(bins, patients["t"].to_numpy(), patients["e"].to_numpy()), indent=2))


@app.command("predict")
def predict_command(
    inputs: List[Path] = typer.Argument(..., help="One patient's feature files (.h5), slides, or slide ids of --job."),
    checkpoint: Path = typer.Option(..., "--checkpoint", help="A fold folder of a cv run (RUN/fold_k)."),
    job: Optional[Path] = typer.Option(None, "--job", help="Job folder for features of slide inputs."),
    device: str = typer.Option("cpu", "--device"),
    slides_root: Optional[Path] = typer.Option(
        None, "--slides-root", help="Where the job's slide files are now, when they moved (for slide ids without features)."),
) -> None:
    """Print a patient's risk, hazards and survival curve (bin edges in months) as JSON."""
    from slidevl.survival.predict import predict_patient

    result = predict_patient(checkpoint, inputs, job=job, device=device, slides_root=slides_root)
    typer.echo(json.dumps(result, indent=2))


@app.command("zero-shot")
def zero_shot_command(
    features: Path = typer.Option(..., "--features", help="Job folder whose features come from a vision-language encoder."),
    clinical: Path = typer.Option(..., "--clinical", help="Clinical CSV (pathology_id, patient_id, t, e)."),
    text_encoder: str = typer.Option(..., "--text-encoder", help="The features' own text tower: conch:PATH or openclip:DIR."),
    prompts: str = typer.Option("synthetic", "--prompts", help="Prompt bank: synthetic, brca, luad, ucec or a JSON path."),
    encoder: Optional[str] = typer.Option(None, "--encoder", help="Feature encoder folder when the job has several."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the per-patient risks and the C-index here (JSON)."),
) -> None:
    """Risk from prompt alignment alone, no training: the C-index says whether the prompts mean something."""
    from slidevl.atomic import write_json_atomic
    from slidevl.survival.zeroshot import zero_shot_prognosis

    result = zero_shot_prognosis(features, clinical, text_encoder, prompts, encoder=encoder)
    if out is not None:
        write_json_atomic(out, result)
    typer.echo(f"zero-shot C-index {result['c_index']:.3f} over {result['n_patients']} patients "
               f"({result['n_events']} events), text space {result['text_space']}")


@app.command("compare")
def compare_command(
    a: List[Path] = typer.Option(..., "--a", help="Run folder(s) of the first model, one per seed."),
    b: List[Path] = typer.Option(..., "--b", help="Run folder(s) of the second model, the same seeds and splits."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the comparison here (JSON)."),
) -> None:
    """Paired, fold-wise comparison of two models: mean C-index difference (a - b), 95% bootstrap CI, Wilcoxon p."""
    from slidevl.atomic import write_json_atomic
    from slidevl.survival.compare import compare_runs

    result = compare_runs(a, b)
    if out is not None:
        write_json_atomic(out, result)
    low, high = result["ci95"]
    typer.echo(f"a - b = {result['effect']:+.3f} C-index (95% CI {low:+.3f} to {high:+.3f}), Wilcoxon p = {result['p']:.3g}, "
               f"a ahead in {result['wins']} of {result['n_pairs']} paired folds"
               + (f", {result['n_dropped']} fold(s) undefined and left out" if result["n_dropped"] else ""))
