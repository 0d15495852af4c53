"""``slidevl vqa``: commands for slide VQA data and evaluation.

The typer ``app`` is mounted by the top-level CLI as ``slidevl vqa``; each command
is a thin wrapper over a Python function (``eval`` -> :func:`slidevl.vqa.evaluate.evaluate`).
Add further commands with ``@app.command(...)`` in their own module and import it
where the app is mounted, or here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from slidevl.cli_errors import ReportingGroup

app = typer.Typer(cls=ReportingGroup, help="Slide VQA: question data, predictions and evaluation.", no_args_is_help=True)


@app.callback()
def _vqa() -> None:
    """Slide VQA: question data, predictions and evaluation."""
    # A callback keeps `eval` a named subcommand even while it is the only one.


@app.command("eval")
def eval_command(
    pred: Path = typer.Option(..., "--pred", help="Predictions JSONL: one {\"id\", \"answer\"} per line."),
    gold: Path = typer.Option(..., "--gold", help="Gold VQA records JSONL."),
    out: Path = typer.Option(..., "--out", help="Where to write the metrics JSON."),
    llm_url: Optional[str] = typer.Option(
        None, "--llm-url", help="OpenAI-compatible base URL for the LLM judge, e.g. http://127.0.0.1:8001/v1."
    ),
    llm_model: Optional[str] = typer.Option(None, "--llm-model", help="Judge model name as the server knows it."),
    llm_cache: Optional[Path] = typer.Option(
        None, "--llm-cache", help="Folder caching judge replies, so reruns send no requests."
    ),
    llm_concurrency: int = typer.Option(4, "--llm-concurrency", min=1, help="Judge requests in flight at once."),
) -> None:
    """Score predictions: choice accuracy, METEOR/BLEU/ROUGE-L, and an LLM judge when --llm-url is given."""
    from rich.console import Console

    from slidevl.errors import InputError
    from slidevl.llmclient import LLMClient
    from slidevl.vqa.evaluate import evaluate, report_table

    if (llm_url is None) != (llm_model is None):
        raise InputError("--llm-url and --llm-model go together: give both to run the judge, or neither to skip it")
    if llm_cache is not None and llm_url is None:
        raise InputError("--llm-cache needs --llm-url and --llm-model")
    client = None if llm_url is None else LLMClient(llm_url, llm_model, cache_dir=llm_cache,  # type: ignore[arg-type]
                                                    max_concurrency=llm_concurrency)
    try:
        report = evaluate(pred, gold, client, out=out)
    finally:
        if client is not None:
            client.close()
    console = Console()
    console.print(report_table(report))
    judge = report["judge"]
    if judge["status"] == "skipped":
        console.print(f"judge skipped: {judge['reason']}", soft_wrap=True)
    elif judge["n_errors"]:
        console.print(
            f"judge: {judge['n_errors']} record(s) had unusable replies (see 'judge_error' in {out})", soft_wrap=True
        )
    console.print(f"metrics written to {out}", soft_wrap=True)


@app.command("predict")
def predict_command(
    checkpoint: Path = typer.Option(..., "--checkpoint", help="Tuned checkpoint folder (`slidevl slidellm stage2` output)."),
    records: Path = typer.Option(..., "--records", help="VQA records JSONL to answer (e.g. QA/test.jsonl)."),
    out: Path = typer.Option(..., "--out", help="Where to write the predictions JSONL."),
    job: Optional[Path] = typer.Option(None, "--job", help="Job folder with the slides' features (default: the checkpoint's)."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=1, help="Longest answer, in tokens."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Records answered together."),
    rank_single: bool = typer.Option(
        True, "--rank-single/--no-rank-single",
        help="Answer single-choice questions with the option the model finds most likely (the recipe's; --no-rank-single "
             "generates them freely)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Answer every record again, replacing finished --out."),
    resume: bool = typer.Option(
        False, "--resume", help="Continue a stopped run (a plain rerun does too); a finished --out is left as it is."),
) -> None:
    """Answer every record with a tuned slide VQA checkpoint; score the result with `slidevl vqa eval`.

    Answers are saved after every batch in OUT.partial: after Ctrl-C or a kill, rerun the
    same command and it continues from the last answered record.
    """
    from rich.console import Console

    from slidevl.interrupts import resumable
    from slidevl.vqa.partial import count_answered, partial_path
    from slidevl.vqa.predict import predict_records

    console = Console(stderr=True)
    with resumable(lambda: f"{count_answered(out)} record(s) answered, saved in {partial_path(out)}", console=console):
        run = predict_records(checkpoint, records, out, job=job, max_new_tokens=max_new_tokens,
                              batch_size=batch_size, rank_single=rank_single, overwrite=overwrite, resume=resume,
                              console=console)
    resumed = f", {run.n_resumed} of them from an earlier run" if run.n_resumed else ""
    typer.echo(f"{run.n_records} answers ({run.seconds_per_answer:.3f} s each{resumed}) written to {run.path}")


# `build` lives in its own module; registered here so `slidevl vqa` lists it.
from slidevl.vqa.build_cli import build_command  # noqa: E402

app.command("build")(build_command)
