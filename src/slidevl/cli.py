"""The ``slidevl`` command line: one entry point that mounts each part's commands.

Every command is also a Python function in its own package; this module only wires
them together, so each part can be used without the others.
"""

from __future__ import annotations

import typer

from slidevl.demo import demo_command
from slidevl.features.cli import features_app, preprocess_command
from slidevl.features.job_cli import job_app
from slidevl.features.encoders.cli import app as encoders_app
from slidevl.serve.cli import serve
from slidevl.slidellm.ask_cli import ask_command
from slidevl.slidellm.cli import app as slidellm_app
from slidevl.survival.cli import app as survival_app
from slidevl.synth.cli import app as synth_app
from slidevl.vqa.cli import app as vqa_app

app = typer.Typer(
    name="slidevl",
    help="Vision-language analysis of whole-slide images: survival risk with evidence, and questions answered in words.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def _quiet_hub_progress() -> None:
    """Vision-language analysis of whole-slide images."""
    # Model loading bars from transformers would interleave with our own rich progress.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


app.command("demo")(demo_command)
app.add_typer(synth_app, name="synth")
app.command("preprocess")(preprocess_command)
app.add_typer(features_app, name="features")
app.add_typer(job_app, name="job")
app.add_typer(encoders_app, name="encoders")
app.add_typer(survival_app, name="survival")
app.add_typer(vqa_app, name="vqa")
app.add_typer(slidellm_app, name="slidellm")
app.command("ask")(ask_command)
app.command("serve")(serve)
