"""``slidevl survival …``: cross-validation, label bins and prediction from the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, List, Optional

import typer
from rich.console import Console

app = typer.Typer(
    help="Survival prediction from WSI features: HiLa and MIL baselines with honest cross-validation.",
    no_args_is_help=True,
    add_completion=False,
)
_err = Console(stderr=True)


def _fail(exc: Exception) -> typer.Exit:
    _err.print(f"[red]error:[/] {exc}")
    return typer.Exit(code=1)


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
    clinical: Path = typer.Option(..., "--clinical", help="CSV with pathology_id, patient_id, e, t (months)."),
    out: Path = typer.Option(..., "--out", help="Run folder to write."),
    splits: Optional[Path] = typer.Option(None, "--splits", help="Folder of splits_{k}.csv; omitted: make event-stratified folds."),
    model: str = typer.Option("hila", "--model", help="meanpool, abmil, transmil or hila."),
    k: int = typer.Option(5, "--k", help="Number of folds when making splits."),
    epochs: int = typer.Option(20, "--epochs"),
    seed: int = typer.Option(0, "--seed"),
    variant: str = typer.Option("full", "--variant", help="HiLa: full, A (single prompt), B (no CLP), C (no MCL), D (patch only)."),
    skip_missing: bool = typer.Option(False, "--skip-missing", help="Leave out slides without features instead of failing."),
    bins_mode: str = typer.Option("all", "--bins-mode", help="all: MCAT bins on the whole cohort; train: on each training fold."),
    n_bins: int = typer.Option(4, "--n-bins"),
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
    grad_accum: int = typer.Option(32, "--grad-accum", help="Patients per optimiser step."),
    alpha: float = typer.Option(0.0, "--alpha", help="NLL weight of the uncensored term."),
    option: List[str] = typer.Option([], "--option", help="Model hyper-parameter key=value (repeatable), e.g. dim=128."),
    standardize: bool = typer.Option(True, "--standardize/--no-standardize", help="Standardise features on each training fold."),
    no_evidence: bool = typer.Option(False, "--no-evidence", help="Do not write evidence/<slide>.json."),
    threads: int = typer.Option(0, "--threads", help="CPU threads for torch (0: torch's default); 1 is fastest for small bags on shared machines."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Cross-validate a model; write summary.json, oof_risks.csv, km.png and fold_k/ checkpoints."""
    from slidevl.features.store import FeatureStoreError
    from slidevl.survival.cohort import CohortError
    from slidevl.survival.cv import CVConfig, run_cv
    from slidevl.survival.hila.prompts import PromptError
    from slidevl.survival.report import print_cv_table
    from slidevl.survival.train import ConfigError

    try:
        config = CVConfig(
            features=features, clinical=clinical, out=out, model=model, splits=splits, k=k, epochs=epochs, seed=seed,
            lr=lr, weight_decay=weight_decay, grad_accum=grad_accum, alpha=alpha, n_bins=n_bins, bins_mode=bins_mode,
            variant=variant, prompts=prompts, text_encoder=text_encoder, region_tokens=region_tokens, encoder=encoder,
            skip_missing=skip_missing, device=device, model_options=_parse_options(option), standardize=standardize,
            evidence=not no_evidence,
        )
        if threads > 0:
            import torch

            torch.set_num_threads(threads)
        summary = run_cv(config, show_progress=not quiet, console=_err)
    except (CohortError, FeatureStoreError, PromptError, ConfigError) as exc:
        raise _fail(exc) from exc
    print_cv_table(summary)
    Console().print(f"run folder: {out}")


@app.command("bins")
def bins_command(
    clinical: Path = typer.Option(..., "--clinical", help="CSV with pathology_id, patient_id, e, t."),
    n_bins: int = typer.Option(4, "--n-bins"),
) -> None:
    """Print the MCAT survival-bin edges (months) and per-bin patient/event counts as JSON."""
    from slidevl.survival.cohort import CohortError, load_cohort
    from slidevl.survival.labels import bin_summary, fit_bins

    try:
        patients = load_cohort(clinical).patients
        bins = fit_bins(patients["t"].to_numpy(), patients["e"].to_numpy(), n_bins, mode="all")
    except CohortError as exc:
        raise _fail(exc) from exc
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
    from slidevl.features.store import FeatureStoreError
    from slidevl.survival.checkpoint import CheckpointError
    from slidevl.survival.predict import PredictInputError, predict_patient

    try:
        result = predict_patient(checkpoint, inputs, job=job, device=device, slides_root=slides_root)
    except (CheckpointError, PredictInputError, FeatureStoreError) as exc:
        raise _fail(exc) from exc
    typer.echo(json.dumps(result, indent=2))
