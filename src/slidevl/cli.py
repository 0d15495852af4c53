"""The ``slidevl`` command line: one entry point that mounts each part's commands.

Every command is also a Python function in its own package; this module only wires
them together, so each part can be used without the others.

Commands are named here by ``module:attribute`` and imported only when run: a second
``slidevl ask`` must not pay for the survival, preprocessing and serving stacks (torch
vision models, scikit-learn, OpenSlide, ...) just to start. ``slidevl --help`` imports
them all, since each command's help text lives with the command.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator, MutableMapping
from typing import Any

import click
import typer

from slidevl.cli_errors import ReportingGroup
from slidevl.cpus import set_torch_threads

#: Every command, in the order ``--help`` lists them (single commands, then groups): a command
#: function or a typer app (a group of commands).
COMMANDS: dict[str, str] = {
    "demo": "slidevl.demo:demo_command",
    "preprocess": "slidevl.features.cli:preprocess_command",
    "ask": "slidevl.slidellm.ask_cli:ask_command",
    "serve": "slidevl.serve.cli:serve",
    "synth": "slidevl.synth.cli:app",
    "features": "slidevl.features.cli:features_app",
    "job": "slidevl.features.job_cli:job_app",
    "encoders": "slidevl.features.encoders.cli:app",
    "survival": "slidevl.survival.cli:app",
    "vqa": "slidevl.vqa.cli:app",
    "slidellm": "slidevl.slidellm.cli:app",
}


def load_command(name: str, target: str) -> click.Command:
    """Import ``target`` (``module:attr``) and turn it into the click command ``name``."""
    module, _, attr = target.partition(":")
    obj = getattr(importlib.import_module(module), attr)
    if isinstance(obj, typer.Typer):
        command: click.Command = typer.main.get_group(obj)
    else:
        single = typer.Typer(add_completion=False)
        single.command(name)(obj)
        command = typer.main.get_command(single)
    command.name = name
    return command


class _LazyCommands(MutableMapping[str, click.Command]):
    """The group's command table: every name is known up front, each command is built on first lookup."""

    def __init__(self, loaded: MutableMapping[str, click.Command], lazy: dict[str, str]) -> None:
        self._loaded = dict(loaded)
        self._lazy = {name: target for name, target in lazy.items() if name not in self._loaded}

    def __getitem__(self, name: str) -> click.Command:
        if name not in self._loaded:
            if name not in self._lazy:
                raise KeyError(name)
            self._loaded[name] = load_command(name, self._lazy[name])
        return self._loaded[name]

    def __setitem__(self, name: str, command: click.Command) -> None:
        self._loaded[name] = command

    def __delitem__(self, name: str) -> None:
        self._loaded.pop(name, None)
        self._lazy.pop(name, None)

    def __iter__(self) -> Iterator[str]:
        # Names alone (typo suggestions, listing) import nothing.
        yield from self._loaded
        yield from (name for name in self._lazy if name not in self._loaded)

    def __len__(self) -> int:
        return len(set(self._loaded) | set(self._lazy))


class LazyGroup(ReportingGroup):
    """A typer group whose :data:`COMMANDS` are imported when looked up (run, or listed by ``--help``).

    Every command's :class:`~slidevl.errors.SlideVLError` ends in one ``error:`` line and its
    exit code (:mod:`slidevl.cli_errors`, ``docs/errors.md``).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.commands = _LazyCommands(self.commands, COMMANDS)


app = typer.Typer(
    name="slidevl",
    cls=LazyGroup,
    help="Vision-language analysis of whole-slide images: survival risk with evidence, and questions answered in words.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def _process_settings(
    threads: int = typer.Option(
        0, "--threads", min=0,
        help="CPU threads for torch in any command (0: torch's default, one per core). On a machine other jobs "
             "keep busy, fewer threads than cores run faster: a thread on a busy core stalls the others at every step. "
             "A command's own --threads (survival, demo) wins.",
    ),
) -> None:
    """Vision-language analysis of whole-slide images."""
    # Model loading bars from transformers would interleave with our own rich progress.
    # The variable is read when transformers is first imported, so nothing is imported
    # here (the command that needs transformers imports it); a user's own setting wins.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if threads:
        set_torch_threads(threads)
