"""``slidevl survival …``: cross-validation, label bins and prediction from the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.console import Console

from slidevl.cli_errors import ReportingGroup
from slidevl.ranks import is_main_process

app = typer.Typer(
    cls=ReportingGroup,
    help="Survival prediction from WSI features: HiLa and MIL baselines with honest cross-validation.",
    no_args_is_help=True,
    add_completion=False,
)
_err = Console(stderr=True)


def _auto_int(value: str, option: str) -> int | None:
    """``auto`` → None (fitted to the cohort), else a positive integer."""
    if value == "auto":
        return None
    try:
        number = int(value)
    except ValueError:
        raise typer.BadParameter(f"{option} expects a positive integer or auto, got {value!r}") from None
    if number < 1:
        raise typer.BadParameter(f"{option} expects a positive integer or auto, got {value!r}")
    return number


def _columns(id_col: str, patient_col: str, time_col: str, event_col: str, event_is_censoring: bool, time_unit: str):
    from slidevl.survival.cohort import ClinicalColumns

    return ClinicalColumns(id_col, patient_col, time_col, event_col, event_is_censoring, time_unit)


# The clinical table's layout, shared by `cv` and `bins`.
ID_COL = typer.Option("pathology_id", "--id-col", help="Column of slide ids: the slide file name, with or without extension.")
PATIENT_COL = typer.Option("patient_id", "--patient-col", help="Column of patient ids (a patient's slides form one bag).")
TIME_COL = typer.Option("t", "--time-col", help="Column of survival or follow-up times.")
EVENT_COL = typer.Option("e", "--event-col", help="Column of the event indicator: 1 = event (death), 0 = censored.")
EVENT_IS_CENSORING = typer.Option(
    False, "--event-is-censoring", help="The event column holds a censoring indicator instead: 1 = censored, 0 = event.")
TIME_UNIT = typer.Option("months", "--time-unit", help="Unit of the time column: days, months or years (converted to months).")


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
def cv_command(
    features: Path = typer.Option(..., "--features", help="Job folder with features/<encoder>/<slide>.h5."),
    clinical: Path = typer.Option(..., "--clinical", help="CSV with one row per slide: slide id, patient id, event, time."),
    out: Path = typer.Option(..., "--out", help="Run folder to write (new or empty; see --overwrite and --resume)."),
    splits: Optional[Path] = typer.Option(None, "--splits", help="Folder of splits_{k}.csv; omitted: make event-stratified folds."),
    model: str = typer.Option("hila", "--model", help="meanpool, abmil, transmil or hila."),
    k: Optional[int] = typer.Option(
        None, "--k", help="Number of folds when making splits [default: 5, fewer when the cohort has fewer events]."),
    epochs: int = typer.Option(20, "--epochs"),
    seed: int = typer.Option(0, "--seed"),
    variant: str = typer.Option("full", "--variant", help="HiLa: full, A (single prompt), B (no CLP), C (no MCL), D (patch only)."),
    skip_missing: bool = typer.Option(False, "--skip-missing", help="Leave out slides without features instead of failing."),
    bins_mode: str = typer.Option("all", "--bins-mode", help="all: MCAT bins on the whole cohort; train: on each training fold."),
    n_bins: Optional[int] = typer.Option(
        None, "--n-bins", help="Survival bins [default: 4, fewer when the uncensored times allow fewer distinct edges]."),
    prompts: str = typer.Option("synthetic", "--prompts", help="Prompt bank: synthetic, brca, luad, ucec or a JSON path."),
    text_encoder: str = typer.Option(
        "minilm", "--text-encoder",
        help="minilm (embedded), clip:/path/to/text_tower, or the text tower of the features' own model: conch:/path/to/CONCH "
             "or openclip:DIR|ARCH@CKPT (prompts then share the features' space: no learned bridge, no standardising).",
    ),
    region_tokens: str = typer.Option("auto", "--region-tokens", help="auto, store (region/features) or pooled (mean of patches)."),
    encoder: Optional[str] = typer.Option(None, "--encoder", help="Feature encoder folder when the job has several."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    lr: float = typer.Option(2e-4, "--lr"),
    weight_decay: float = typer.Option(1e-5, "--weight-decay"),
    grad_accum: str = typer.Option(
        "auto", "--grad-accum",
        help="Patients per optimiser step; auto: min(32, max(1, n_train // 32)), i.e. at least 32 steps per epoch."),
    alpha: float = typer.Option(0.0, "--alpha", help="NLL weight of the uncensored term."),
    option: List[str] = typer.Option([], "--option", help="Model hyper-parameter key=value (repeatable), e.g. dim=128."),
    standardize: bool = typer.Option(True, "--standardize/--no-standardize", help="Standardise features on each training fold."),
    no_evidence: bool = typer.Option(False, "--no-evidence", help="Do not write evidence/<slide>.json."),
    threads: int = typer.Option(0, "--threads", help="CPU threads for torch (0: torch's default); 1 is fastest for small bags on shared machines."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
    id_col: str = ID_COL,
    patient_col: str = PATIENT_COL,
    time_col: str = TIME_COL,
    event_col: str = EVENT_COL,
    event_is_censoring: bool = EVENT_IS_CENSORING,
    time_unit: str = TIME_UNIT,
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
    from slidevl.survival.cv import CVConfig, run_cv
    from slidevl.survival.report import print_cv_table
    from slidevl.survival.runfolder import describe_progress

    columns = _columns(id_col, patient_col, time_col, event_col, event_is_censoring, time_unit)
    config = CVConfig(
        features=features, clinical=clinical, out=out, model=model, splits=splits, k=k, epochs=epochs, seed=seed,
        lr=lr, weight_decay=weight_decay, grad_accum=_auto_int(grad_accum, "--grad-accum"), alpha=alpha, n_bins=n_bins,
        bins_mode=bins_mode, variant=variant, prompts=prompts, text_encoder=text_encoder, region_tokens=region_tokens,
        encoder=encoder, skip_missing=skip_missing, device=device, model_options=_parse_options(option),
        standardize=standardize, evidence=not no_evidence, columns=columns,
    )
    if threads > 0:
        import torch

        torch.set_num_threads(threads)
    with resumable(lambda: describe_progress(out), console=_err):
        summary = run_cv(config, show_progress=not quiet, console=_err, overwrite=overwrite, resume=resume)
    if is_main_process():
        print_cv_table(summary)
        Console().print(f"run folder: {out}")


@app.command("bins")
def bins_command(
    clinical: Path = typer.Option(..., "--clinical", help="CSV with one row per slide: slide id, patient id, event, time."),
    n_bins: Optional[int] = typer.Option(None, "--n-bins", help="[default: 4, fewer when the uncensored times allow fewer]"),
    id_col: str = ID_COL,
    patient_col: str = PATIENT_COL,
    time_col: str = TIME_COL,
    event_col: str = EVENT_COL,
    event_is_censoring: bool = EVENT_IS_CENSORING,
    time_unit: str = TIME_UNIT,
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
