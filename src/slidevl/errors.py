"""One error hierarchy for the whole toolkit, and the exit codes the CLI gives for it.

Every error slidevl raises on purpose derives from :class:`SlideVLError`, so a caller
can catch the toolkit's own failures in one ``except`` and let real bugs through. Each
class also derives from the built-in it replaces (``ValueError``, ``RuntimeError``,
``LookupError``), so code written against the built-ins keeps working. Commands report
these errors in one line (:mod:`slidevl.cli_errors`).

Exit codes (the same for every command, see ``docs/errors.md``):

==== ===========================================================================
code meaning
==== ===========================================================================
0    done
1    the work started and failed (a slide could not be read, training diverged)
2    the input or the options are wrong; nothing was done: fix the command
130  interrupted by Ctrl-C; rerun the same command to resume
143  stopped by SIGTERM (Slurm, Ray, ``kill``); rerun the same command to resume
==== ===========================================================================
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class SlideVLError(Exception):
    """Base of every error the toolkit raises on purpose; the message says what to do."""

    exit_code: int = EXIT_FAILED


class InputError(SlideVLError, ValueError):
    """The command's input files or options are wrong, found before any work started."""

    exit_code = EXIT_USAGE


class ConfigError(InputError):
    """A setting, a config file or a recipe is invalid (names the key and the fix)."""


class CheckpointError(InputError):
    """A checkpoint or run folder is missing, incomplete or from an incompatible version."""


class DataError(SlideVLError, RuntimeError):
    """Data met while the work runs cannot be used (a slide cannot be read, or holds no tissue)."""


class SlideError(DataError):
    """A slide file cannot be opened or read."""


class NotFoundError(SlideVLError, LookupError):
    """A named thing (slide id, encoder, model, checkpoint entry) does not exist."""

    exit_code = EXIT_USAGE


class ServiceError(SlideVLError, RuntimeError):
    """An external service (an LLM server, a Ray cluster) failed or could not be reached."""
