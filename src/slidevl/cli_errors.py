"""How every command reports the toolkit's own errors: one line on stderr, one exit code.

A command does not catch :class:`~slidevl.errors.SlideVLError`: it lets it rise to the
command group, which prints ``error: <message>`` on stderr and exits with the error's
``exit_code`` (2 for wrong input or options, 1 for a failure during the work; see
``docs/errors.md``). Any other exception is a bug in slidevl and keeps its traceback.
Ctrl-C and SIGTERM end a command through :func:`slidevl.interrupts.resumable` (130, 143).

The ``slidevl`` app (:mod:`slidevl.cli`) is a :class:`ReportingGroup`. Each part's own
typer app is made with the same class (:class:`ReportingCommand` for a one-command app),
so a part's app run on its own reports errors exactly as ``slidevl`` does.
"""

from __future__ import annotations

from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup

from slidevl.errors import SlideVLError
from slidevl.ranks import is_main_process


def report(exc: SlideVLError) -> typer.Exit:
    """Print ``error: <message>`` on stderr and return the exit that ends the command with ``exc.exit_code``."""
    # Every process of a multi-process launch meets the same error; one line is enough.
    if is_main_process():
        typer.echo(f"error: {exc}", err=True)
    return typer.Exit(exc.exit_code)


class _ReportsErrors:
    """Turns a :class:`SlideVLError` raised while the command runs into :func:`report`."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)  # type: ignore[misc]
        except SlideVLError as exc:
            raise report(exc) from None


class ReportingGroup(_ReportsErrors, TyperGroup):
    """A typer group (``typer.Typer(cls=ReportingGroup)``) whose commands report errors in one line."""


class ReportingCommand(_ReportsErrors, TyperCommand):
    """A single typer command (``app.command(cls=ReportingCommand)``) that reports errors in one line."""
