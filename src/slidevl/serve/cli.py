"""``slidevl serve JOB``: run the viewer on a job folder (loopback only unless asked)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import typer

from slidevl.cli_errors import ReportingCommand
from slidevl.cpus import interactive_openmp
from slidevl.errors import InputError
from slidevl.features.slidepaths import relocate_hint
from slidevl.serve.assets import OSD_MISSING, find_openseadragon
from slidevl.serve.job import ServeJob
from slidevl.serve.vqa import load_checkpoint_answerer
from slidevl.slide.formats import is_slide_path

app = typer.Typer(add_completion=False, help="Web viewer for a slidevl job folder.")


class RemoteBindError(InputError):
    """A non-loopback bind address was asked for without ``--allow-remote``."""


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP literals (127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind_host(host: str, allow_remote: bool) -> None:
    """Refuse to expose the job beyond this machine unless ``allow_remote`` is set."""
    if not allow_remote and not is_loopback(host):
        raise RemoteBindError(
            f"refusing to bind to {host!r}: the viewer serves every slide of the job with no authentication. "
            "Use --host 127.0.0.1 (default), or add --allow-remote if you really want other machines to reach it."
        )


def serve(
    job: Path = typer.Argument(..., help="Job folder written by `slidevl preprocess` (holds manifest.json)."),
    host: str = typer.Option("127.0.0.1", help="Address to bind; non-loopback needs --allow-remote."),
    port: int = typer.Option(8000, min=1, max=65535, help="TCP port."),
    survival_run: Path | None = typer.Option(None, "--survival-run", help="Survival run folder (summary.json, oof_risks.csv, evidence/)."),
    rois: Path | None = typer.Option(None, "--rois", help="Folder of <slide>.json ROI files (default: JOB/rois)."),
    encoder: str | None = typer.Option(None, help="Feature encoder folder under JOB/features (default: the only one)."),
    slides_root: Path | None = typer.Option(
        None, "--slides-root", help="Folder that now holds the slide files, when they moved since preprocessing."),
    vqa_checkpoint: Path | None = typer.Option(None, "--vqa-checkpoint", help="Slide VQA checkpoint to answer the chat."),
    allow_remote: bool = typer.Option(False, "--allow-remote", help="Allow binding to a non-loopback address."),
) -> None:
    """Serve slides, overlays, survival risk and a chat over JOB at http://HOST:PORT/."""
    interactive_openmp()  # before the chat's model loads torch
    import uvicorn

    from slidevl.serve.app import create_app

    check_bind_host(host, allow_remote)
    serve_job = ServeJob(job, survival_run=survival_run, rois_dir=rois, encoder=encoder, slides_root=slides_root)
    answerer = load_checkpoint_answerer(vqa_checkpoint, serve_job.job_dir, slides_root=slides_root) if vqa_checkpoint else None
    _warn_unreachable_slides(serve_job)
    if find_openseadragon() is None:
        typer.echo(f"warning: {OSD_MISSING}; the page will load but cannot show slides", err=True)
    application = create_app(serve_job, answerer=answerer)
    typer.echo(f"slidevl viewer for {serve_job.job_dir} at http://{host}:{port}/ "
               f"(answerer: {application.state.answerer.name}; Ctrl+C to stop)")
    uvicorn.run(application, host=host, port=port, log_level="warning")


def _warn_unreachable_slides(job: ServeJob) -> None:
    # Only existence is checked here (cheap for thousands of slides); opening a slide also
    # checks that it is the file that was processed, and its error names the paths tried.
    missing = [e.slide_id for e in job.slides() if not any(is_slide_path(p) for p in e.slide.candidates(job.job_dir, job.slides_root))]
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        typer.echo(f"warning: {len(missing)} slide file(s) not found ({shown}); their images will not load. "
                   f"If the slides moved, {relocate_hint(job.job_dir)}", err=True)


app.command("serve", cls=ReportingCommand)(serve)
