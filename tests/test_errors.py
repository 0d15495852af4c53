"""One error hierarchy, one exit-code convention (docs/errors.md).

Every exception class of the package derives from :class:`slidevl.errors.SlideVLError`
and keeps a built-in base; every command reports such an error as one ``error:`` line
with the error's exit code, whether it runs under ``slidevl`` or from its part's app.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

import slidevl
from slidevl.cli import COMMANDS, app
from slidevl.cli_errors import ReportingCommand, ReportingGroup
from slidevl.errors import (
    EXIT_FAILED,
    EXIT_SIGINT,
    EXIT_SIGTERM,
    EXIT_USAGE,
    CheckpointError,
    ConfigError,
    DataError,
    InputError,
    ServiceError,
    SlideVLError,
)
from slidevl.interrupts import EXIT_SIGINT as INTERRUPT_SIGINT
from slidevl.interrupts import EXIT_SIGTERM as INTERRUPT_SIGTERM

runner = CliRunner()


def _modules() -> list[object]:
    names = [m.name for m in pkgutil.walk_packages(slidevl.__path__, "slidevl.") if m.name != "slidevl.__main__"]
    return [importlib.import_module(name) for name in names]


@pytest.fixture(scope="module")
def modules() -> list[object]:
    return _modules()


def test_every_error_class_derives_from_slidevl_error(modules: list[object]) -> None:
    classes = {
        cls
        for module in modules
        for _, cls in inspect.getmembers(module, inspect.isclass)
        if cls.__module__ == module.__name__ and issubclass(cls, Exception)
    }
    assert len(classes) > 40  # the walk found the package's errors, not an empty list
    stray = sorted(f"{c.__module__}.{c.__qualname__}" for c in classes if not issubclass(c, SlideVLError))
    assert not stray, f"error classes outside slidevl.errors.SlideVLError: {stray}"
    # `except ValueError` / `except RuntimeError` / `except LookupError` written before keeps working.
    bare = sorted(c.__qualname__ for c in classes - {SlideVLError}
                  if not issubclass(c, (ValueError, RuntimeError, LookupError)))
    assert not bare, f"error classes without a built-in base: {bare}"
    assert {c.exit_code for c in classes} <= {EXIT_FAILED, EXIT_USAGE}


def test_one_definition_of_each_error_and_exit_code() -> None:
    from slidevl.slidellm.pretrain import checkpoint as pretrain_checkpoint
    from slidevl.slidellm.tuning import state
    from slidevl.survival import checkpoint as survival_checkpoint
    from slidevl.survival import train

    for module in (pretrain_checkpoint, state, survival_checkpoint):
        assert module.CheckpointError is CheckpointError
    assert train.ConfigError is ConfigError
    assert (INTERRUPT_SIGINT, INTERRUPT_SIGTERM) == (EXIT_SIGINT, EXIT_SIGTERM) == (130, 143)


def test_every_typer_app_reports_errors(modules: list[object]) -> None:
    apps = {
        f"{module.__name__}.{name}": obj
        for module in modules
        for name, obj in vars(module).items()
        if isinstance(obj, typer.Typer)
    }
    assert "slidevl.cli.app" in apps and len(apps) >= 10
    plain = [name for name, obj in apps.items()
             if not isinstance(typer.main.get_command(obj), (ReportingGroup, ReportingCommand))]
    assert not plain, f"apps that would print a traceback for a SlideVLError: {plain}"


def _bad_inputs(tmp: Path) -> dict[str, list[str]]:
    """One wrong command line per top-level command, each refused before any work starts."""
    empty = tmp / "empty"
    empty.mkdir()
    return {
        "demo": ["demo", "--out", str(tmp / "out"), "--slide-px", "100"],
        "synth": ["synth", "cohort", str(tmp / "out"), "--patients", "3", "--folds", "5"],
        "preprocess": ["preprocess", str(empty), "--out", str(tmp / "out"), "--shard", "x"],
        "features": ["features", "import", str(empty), "--format", "clam", "--out", str(tmp / "out")],
        "job": ["job", "check", str(empty)],
        "encoders": ["encoders", "list", "--json", "--markdown"],
        "survival": ["survival", "bins", "--clinical", str(tmp / "missing.csv")],
        "vqa": ["vqa", "eval", "--pred", "p.jsonl", "--gold", "g.jsonl", "--out", str(tmp / "out"), "--llm-url", "http://x"],
        "slidellm": ["slidellm", "pretrain", "--features", str(empty), "--out", str(tmp / "out")],
        "ask": ["ask", "slide.svs"],
        "serve": ["serve", str(empty), "--host", "0.0.0.0"],
    }


def test_every_command_refuses_bad_input_with_one_line_and_exit_2(tmp_path: Path) -> None:
    cases = _bad_inputs(tmp_path)
    assert set(cases) == set(COMMANDS), "give every top-level command a bad-input case here"
    for name, args in cases.items():
        result = runner.invoke(app, args)
        assert result.exit_code == EXIT_USAGE, (name, result.output, result.exception)
        errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and "Traceback" not in result.output, (name, result.output)
        assert not (tmp_path / "out").exists(), f"{name} wrote output for a refused command line"


def _tiny_app(exc: Exception) -> typer.Typer:
    tiny = typer.Typer(cls=ReportingGroup)

    @tiny.callback()
    def _group() -> None:
        """A group, as every part's app is."""

    @tiny.command("run")
    def _run() -> None:
        raise exc

    return tiny


@pytest.mark.parametrize(
    "exc, code",
    [
        (InputError("--k must be >= 2"), EXIT_USAGE),
        (DataError("slide.svs: tile 3,4 cannot be decoded"), EXIT_FAILED),
        (ServiceError("cannot reach the LLM endpoint"), EXIT_FAILED),
    ],
)
def test_failures_during_work_exit_1_and_input_errors_exit_2(exc: SlideVLError, code: int) -> None:
    result = runner.invoke(_tiny_app(exc), ["run"])
    assert result.exit_code == code
    assert result.output.strip() == f"error: {exc}"


def test_a_bug_keeps_its_traceback() -> None:
    result = runner.invoke(_tiny_app(KeyError("slide_id")), ["run"])
    assert isinstance(result.exception, KeyError) and "error:" not in result.output


def test_only_the_main_process_prints(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")
    result = runner.invoke(_tiny_app(InputError("--records: file not found")), ["run"])
    assert result.exit_code == EXIT_USAGE and result.output == ""
