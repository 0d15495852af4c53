"""``slidevl ask``: a question about a slide, answered by a tuned checkpoint.

One-shot::

    slidevl ask slide.svs "Is there a tumour?" --checkpoint runs/stage2
    slidevl ask TCGA-XX-0001 "Describe this region." --bbox 0,0,4096,4096 --checkpoint runs/stage2 --job jobs/tcga

A one-shot ask leaves the loaded model in a background process for the next one (see
:mod:`slidevl.slidellm.ask_warm`), which then answers in about a second instead of
paying for the imports and the checkpoint load again; ``--no-keep-warm`` (or
``SLIDEVL_ASK_KEEP_WARM=0``) answers in the command's own process and leaves nothing
behind, ``slidevl ask --stop-warm`` stops the background model now.

Interactive (the slide stays loaded; the history is kept)::

    slidevl ask slide.svs --interactive --checkpoint runs/stage2
    > /bbox 0,0,4096,4096      ask about a region from now on (/bbox alone: whole slide)
    > /reset                   forget the history
    > /quit
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.console import Console

from slidevl.cli_errors import ReportingCommand
from slidevl.errors import InputError
from slidevl.slidellm.ask_warm import DEFAULT_CACHE, DEFAULT_IDLE_S, ENV_IDLE, ENV_KEEP_WARM

if TYPE_CHECKING:  # the model stack is imported only when a command runs, keeping `--help` fast
    from slidevl.slidellm.ask import Conversation

_out = Console()
_err = Console(stderr=True)


def ask_command(
    slide: Annotated[Optional[str], typer.Argument(help="A slide file, or the id of a slide in --job (or in the checkpoint's training job).")] = None,
    question: Annotated[Optional[str], typer.Argument(help="The question; for choice questions put the options in the text.")] = None,
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="Stage-2 (or stage-1) run folder.")] = Path("."),
    bbox: Annotated[Optional[str], typer.Option("--bbox", help="Region in level-0 pixels: x0,y0,x1,y1.")] = None,
    job: Annotated[Optional[Path], typer.Option("--job", help="Job folder holding the slide id's features, or receiving a slide file's features (default: --cache).")] = None,
    interactive: Annotated[bool, typer.Option("--interactive", "-i", help="Read questions from stdin until /quit.")] = False,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="Longest answer, in tokens (greedy decoding).")] = 128,
    device: Annotated[Optional[str], typer.Option("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available).")] = None,
    slides_root: Annotated[Optional[Path], typer.Option("--slides-root", help="Where the --job's slide files are now, when they moved (used when a slide id's features must be computed).")] = None,
    cache: Annotated[Path, typer.Option("--cache", help="Cache folder: features of slide files given without --job, and encoder outputs.")] = DEFAULT_CACHE,
    keep_warm: Annotated[bool, typer.Option("--keep-warm/--no-keep-warm", envvar=ENV_KEEP_WARM, help="Answer through a background process that keeps the model loaded for the next ask (started by the first one).")] = True,
    warm_idle: Annotated[float, typer.Option("--warm-idle", min=1, envvar=ENV_IDLE, help="Seconds without a question before the background model exits.")] = DEFAULT_IDLE_S,
    stop_warm: Annotated[bool, typer.Option("--stop-warm", help="Stop the background models under --cache, and nothing else.")] = False,
) -> None:
    """Answer a question about a slide, from the slide file (or id) to the answer in one command."""
    if stop_warm:
        _stop_warm(cache)
        return
    # Checked before the model stack is imported, so a wrong command line is answered at once.
    if slide is None:
        raise InputError("give a SLIDE (a slide file or a slide id) and a QUESTION, or --stop-warm")
    if question is None and not interactive:
        raise InputError("give a QUESTION, or --interactive to read questions from stdin")
    if keep_warm and question is not None and not interactive and _ask_warm(
            slide, question, checkpoint=checkpoint, bbox=bbox, job=job, max_new_tokens=max_new_tokens, device=device,
            slides_root=slides_root, cache=cache, idle_s=warm_idle):
        return
    from slidevl.cpus import interactive_openmp

    interactive_openmp()
    from slidevl.slidellm.ask import SlideAssistant
    from slidevl.slidellm.model import parse_bbox

    region = parse_bbox(bbox) if bbox else None
    assistant = SlideAssistant(checkpoint, device=device, cache_root=cache)
    _say_if_created(assistant.cache_root)
    conversation = assistant.conversation(assistant.open_slide(slide, job=job, console=_err, slides_root=slides_root), bbox=region)
    if question is not None:
        _out.print(conversation.ask(question, max_new_tokens=max_new_tokens), markup=False, highlight=False)
    if interactive:
        _chat(conversation, max_new_tokens)


def _say_if_created(cache_root: Path) -> None:
    # Features and encoder outputs are kept there. Said when this command creates it, not on
    # every call: a second question about the same slide prints its answer alone.
    if not cache_root.exists():
        _err.print(f"cache: {cache_root} (created; slide features and encoder outputs are kept here, "
                   "move it with --cache)", highlight=False, soft_wrap=True)


def _ask_warm(slide: str, question: str, *, checkpoint: Path, bbox: Optional[str], job: Optional[Path], max_new_tokens: int,
              device: Optional[str], slides_root: Optional[Path], cache: Path, idle_s: float) -> bool:
    """Answer through the warm model (starting it when none runs); False when this process must answer."""
    import os

    from slidevl.slidellm import ask_warm

    warm = ask_warm.target(checkpoint, device, cache)
    if warm is None:  # no such checkpoint folder: the in-process load says so
        return False
    _say_if_created(cache.expanduser())
    request = {"slide": slide, "question": question, "bbox": bbox, "job": None if job is None else str(job),
               "slides_root": None if slides_root is None else str(slides_root), "max_new_tokens": max_new_tokens,
               "cwd": os.getcwd(), "tty": _err.is_terminal, "width": _err.width}
    reply = ask_warm.ask(warm, request, idle_s=idle_s, stderr=sys.stderr)
    if reply is None:
        return False
    _out.print(reply.answer, markup=False, highlight=False)
    if not reply.started:
        _err.print(f"answered by the warm model (pid {reply.pid})", style="dim", highlight=False)
    return True


def _stop_warm(cache: Path) -> None:
    from slidevl.slidellm.ask_warm import stop_all

    stopped = stop_all(cache)
    for info in stopped:
        _err.print(f"stopped the warm model pid {info['pid']} ({info['checkpoint']})", highlight=False, soft_wrap=True)
    if not stopped:
        _err.print(f"no warm model runs under {cache}", highlight=False, soft_wrap=True)


def _chat(conversation: "Conversation", max_new_tokens: int) -> None:
    from slidevl.slidellm.model import SlideVLMError, parse_bbox

    prompt = sys.stdin.isatty()
    while True:
        if prompt:
            _err.print("[bold]>[/] ", end="")
        line = sys.stdin.readline()
        if not line:
            return
        line = line.strip()
        if not line:
            continue
        try:
            if line in ("/quit", "/exit"):
                return
            if line == "/reset":
                conversation.reset()
                _err.print("history cleared")
            elif line == "/bbox" or line.startswith("/bbox "):
                arg = line[len("/bbox"):].strip()
                conversation.set_region(parse_bbox(arg) if arg else None)
                _err.print(f"region: {arg or 'whole slide'}")
            elif line.startswith("/"):
                _err.print("commands: /bbox x0,y0,x1,y1 | /bbox | /reset | /quit")
            else:
                _out.print(conversation.ask(line, max_new_tokens=max_new_tokens), markup=False, highlight=False)
        except SlideVLMError as exc:
            _err.print(f"[bold red]error:[/] {exc}")


#: A one-command app, so the command can be run and tested on its own.
app = typer.Typer(add_completion=False)
app.command("ask", cls=ReportingCommand)(ask_command)
