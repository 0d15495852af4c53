"""``slidevl job check`` and ``slidevl job relocate``: the command-line face of :mod:`slidevl.features.jobcheck`.

Exit codes: 0 = everything is fine (check) or the slides were relocated, 1 = problems
found (check: also after ``--fix`` when some remain; relocate: nothing was changed),
2 = usage error (not a job folder, no such slides root).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from slidevl.cli_errors import ReportingGroup
from slidevl.errors import EXIT_FAILED
from slidevl.features import jobs
from slidevl.features.jobcheck import CheckReport, Relocation, check_job, fix_job, plan_relocation, relocate_job

job_app = typer.Typer(cls=ReportingGroup, help="Job folders: check their integrity, record moved slides.",
                      no_args_is_help=True, add_completion=False)
_out = Console()
_err = Console(stderr=True)


def _cell(problem: str | None) -> str:
    return "[green]ok[/]" if problem is None else f"[red]{escape(problem)}[/]"


def _check_table(report: CheckReport) -> Table:
    table = Table(title=f"job check: {report.job}", show_lines=True)
    for column in ("slide", "status", "store", "fingerprint", "slide file", "manifest", "fix"):
        table.add_column(column, overflow="fold")
    for c in report.slides:
        status = escape(c.status) if c.status_problem is None else f"[red]{escape(c.status_problem)}[/]"
        # Only a completed slide has a store to check, and a fingerprint only once the store reads.
        completed = c.status in ("ok", "skipped")
        store = _cell(c.store_problem) if completed else "-"
        fingerprint = _cell(c.fingerprint_problem) if completed and c.store_problem is None else "-"
        table.add_row(c.slide_id, status, store, fingerprint, _cell(c.slide_problem), _cell(c.manifest_problem), escape(c.fix or ""))
    return table


def _checked(job: Path, slides_root: Path | None) -> CheckReport:
    n = len(jobs.status_files(job))
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), console=_err, transient=True) as bar:
        task = bar.add_task("checking", total=n)

        def advance(slide_id: str) -> None:
            bar.update(task, description=f"checking {slide_id}")
            bar.advance(task)

        return check_job(job, slides_root=slides_root, progress=advance)


@job_app.command("check")
def check_command(
    job: Path = typer.Argument(..., help="Job folder written by `slidevl preprocess`."),
    fix: bool = typer.Option(False, "--fix", help="Rebuild a stale manifest and mark broken stores for recomputation."),
    slides_root: Optional[Path] = typer.Option(None, "--slides-root", help="Look for the slide files in this folder first."),
) -> None:
    """Check every slide's store, fingerprint, slide file and manifest row; print one table."""
    report = _checked(job, slides_root)
    if fix and not report.ok:
        done = fix_job(job, report)
        for line in done:
            _out.print(f"[yellow]fixed[/] {escape(line)}", soft_wrap=True)
        if done:
            report = _checked(job, slides_root)
    _out.print(_check_table(report))
    bad = sum(not c.ok for c in report.slides)
    if bad:
        _out.print(f"[red]{bad} of {len(report.slides)} slide(s) need attention[/]; see the fix column")
        raise typer.Exit(EXIT_FAILED)
    _out.print(f"[green]all {len(report.slides)} slide(s) are fine[/]")


def _relocation_table(job: Path, plan: list[Relocation]) -> Table:
    table = Table(title=f"job relocate: {job}", show_lines=True)
    for column in ("slide", "recorded", "new", "result"):
        table.add_column(column, overflow="fold")
    for r in plan:
        table.add_row(r.slide_id, escape(r.old), escape(str(r.new)), _cell(r.problem))
    return table


@job_app.command("relocate")
def relocate_command(
    job: Path = typer.Argument(..., help="Job folder written by `slidevl preprocess`."),
    slides_root: Path = typer.Option(..., "--slides-root", help="Folder that now holds the job's slide files."),
) -> None:
    """Record that the job's slides are now in SLIDES_ROOT, after checking that every one is there and unchanged."""
    plan = plan_relocation(job, slides_root)
    _out.print(_relocation_table(job, plan))
    bad = [r for r in plan if r.problem]
    if bad:
        _out.print(f"[red]{len(bad)} of {len(plan)} slide(s) cannot be relocated; nothing was changed.[/] "
                   "Put the original files in the folder (a changed file is never paired with the old features), "
                   "or re-run `slidevl preprocess` for them.")
        raise typer.Exit(EXIT_FAILED)
    manifest = relocate_job(job, plan)
    _out.print(f"[green]relocated {len(plan)} slide(s)[/]; records and {manifest} rewritten")
