"""Ctrl-C and SIGTERM end a long command with one line, never a traceback.

Every long command (preprocess, cross-validation, VQA prediction, training) wraps its
work in :func:`resumable`. SIGTERM (what Slurm, Ray and ``kill`` send) is turned into
the same ``KeyboardInterrupt`` as Ctrl-C, so one code path cleans up: the command's own
``finally`` blocks mark unfinished work as interrupted and rebuild manifests, then this
context prints what finished and ``rerun the same command to resume``, and exits with
the shell's code for the signal (130 for SIGINT, 143 for SIGTERM). Under a multi-process
launch every process stops the same way, and only the main one prints the line.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Callable, Iterator

import typer
from rich.console import Console

from slidevl.errors import EXIT_SIGINT, EXIT_SIGTERM
from slidevl.ranks import is_main_process


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C's ``KeyboardInterrupt`` would be."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


@contextlib.contextmanager
def resumable(done: Callable[[], str], *, console: Console | None = None) -> Iterator[None]:
    """Run the body; on SIGINT/SIGTERM print ``interrupted: <done()>`` and how to resume, then exit.

    ``done`` is called after the body's own cleanup has run and says what finished
    (e.g. ``"3 of 5 folds finished"``). Signal handlers can only be set from the main
    thread; elsewhere (a test runner's worker thread) SIGTERM keeps its old handler.
    """
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main else None
    try:
        yield
    except KeyboardInterrupt as exc:
        code = EXIT_SIGTERM if isinstance(exc, Terminated) else EXIT_SIGINT
        if is_main_process():
            (console or Console(stderr=True)).print(
                f"[yellow]interrupted[/]: {done()}; rerun the same command to resume", highlight=False
            )
        raise typer.Exit(code) from None
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
