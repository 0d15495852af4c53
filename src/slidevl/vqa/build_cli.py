"""``slidevl vqa build``: the command-line face of :func:`slidevl.vqa.build.build_qa`.

::

    slidevl vqa build --cohort demo/cohort --job demo/job --out demo/qa
    slidevl vqa build --cohort demo/cohort --job demo/job --out demo/qa --mode llm \\
        --llm-url http://127.0.0.1:8001/v1 --llm-model Qwen2.5-7B-Instruct
    # your own slides (no truth.json): a vision-language model estimates the facts
    slidevl vqa build --job jobs/mine --out qa/mine \\
        --llm-url http://127.0.0.1:8000/v1 --llm-model Qwen/Qwen2.5-VL-7B-Instruct
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from slidevl.cli_config import field_option
from slidevl.errors import InputError
from slidevl.vqa.build import BuildConfig


def _help(name: str) -> str:
    """The help text of BuildConfig's field ``name``, for options typed in another form than the field's."""
    return BuildConfig.__dataclass_fields__[name].metadata["help"]


def build_command(
    cohort: Optional[Path] = typer.Option(
        None, "--cohort",
        help="Synthetic cohort folder (truth.json, labels/); default: the one the job's slides came from, if any. "
             "Without one, facts come from the vision-language model at --llm-url.",
    ),
    job: Path = typer.Option(..., "--job", help="Preprocessing job folder holding the cohort's feature files."),
    out: Path = typer.Option(..., "--out", help="Output folder: train.jsonl, test.jsonl, rois/, summary.json."),
    k_rois: int = field_option(BuildConfig, "k_rois", "--k-rois"),
    # Typed as text ("8,12") and a list of SCALE:PIXELS; the config holds the parsed values.
    train_extra_rois: str = typer.Option(
        ",".join(map(str, BuildConfig().train_extra_k)), "--train-extra-rois", help=_help("train_extra_k")),
    train_patch_fields: int = field_option(BuildConfig, "train_patch_fields", "--train-patch-fields"),
    train_slide_scale: bool = field_option(BuildConfig, "train_slide_scale", "--train-slide-scale/--no-train-slide-scale"),
    roi_method: str = field_option(BuildConfig, "roi_method", "--roi-method"),
    window: Optional[List[str]] = typer.Option(None, "--window", help=_help("windows")),
    min_window_tissue: float = field_option(BuildConfig, "min_window_tissue", "--min-window-tissue"),
    mode: str = field_option(BuildConfig, "mode", "--mode"),
    llm_url: Optional[str] = typer.Option(
        None, "--llm-url", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8001/v1 (--mode llm, or facts of slides without truth.json)."),
    llm_model: Optional[str] = typer.Option(None, "--llm-model", help="Model name as the server knows it."),
    llm_cache: Optional[Path] = typer.Option(None, "--llm-cache", help="Reply cache folder (default: OUT/llm_cache)."),
    llm_concurrency: int = typer.Option(4, "--llm-concurrency", min=1, help="LLM requests in flight at once."),
    test_fraction: float = field_option(BuildConfig, "test_fraction", "--test-fraction"),
    seed: int = field_option(BuildConfig, "seed", "--seed"),
    encoder: Optional[str] = field_option(BuildConfig, "encoder", "--encoder"),
    slides_root: Optional[Path] = typer.Option(
        None, "--slides-root", help="Where the job's slide files are now, when they moved (the LLM facts read images from them)."),
) -> None:
    """Build hierarchical QA (WSI -> ROI -> patch) with a patient-level train/test split.

    Facts come from truth.json for a synthetic cohort, else from a vision-language model
    shown each slide, ROI and field (--llm-url/--llm-model; see the README).
    """
    from rich.console import Console

    from slidevl.llmclient import LLMClient
    from slidevl.vqa.build import build_qa
    from slidevl.vqa.windows import DEFAULT_WINDOWS, WindowSpec

    if mode == "llm" and (llm_url is None or llm_model is None):
        raise InputError("--mode llm needs --llm-url and --llm-model")
    if (llm_url is None) != (llm_model is None) or (llm_cache is not None and llm_url is None):
        raise InputError("--llm-url and --llm-model go together (and --llm-cache needs them)")
    windows = tuple(WindowSpec.parse(w) for w in window) if window else DEFAULT_WINDOWS
    config = BuildConfig(
        k_rois=k_rois, train_extra_k=_counts(train_extra_rois), train_patch_fields=train_patch_fields,
        train_slide_scale=train_slide_scale, roi_method=roi_method, windows=windows, min_window_tissue=min_window_tissue,
        mode=mode, test_fraction=test_fraction, seed=seed, encoder=encoder,
    )
    client = None
    if llm_url is not None:
        client = LLMClient(llm_url, llm_model, cache_dir=llm_cache or out / "llm_cache",  # type: ignore[arg-type]
                           max_concurrency=llm_concurrency)
    console = Console()
    try:
        report = build_qa(cohort, job, out, config, client=client, console=console, slides_root=slides_root)
    finally:
        if client is not None:
            client.close()
    s = report.summary
    for name in ("train", "test"):
        split = s["splits"][name]
        console.print(
            f"{name}: {split['counts']['total']} records from {split['n_slides']} slide(s) of "
            f"{split['n_patients']} patient(s) -> {getattr(report, name)}",
            soft_wrap=True,
        )
    console.print(f"ROIs: {s['rois']['total']} in {report.rois_dir}; windows kept {s['windows']['kept']}, "
                  f"rejected {s['windows']['rejected']}", soft_wrap=True)
    if s["llm"] is not None:
        llm = s["llm"]
        console.print(f"LLM: {llm['rewritten']} of {llm['units']} units rewritten, {llm['failed']} failed "
                      f"({llm['requests']} requests, {llm['cache_hits']} cache hits)", soft_wrap=True)
        if report.failures_path is not None:
            console.print(f"failed units kept their template texts; see {report.failures_path}", soft_wrap=True)
    console.print(f"summary written to {report.summary_path}", soft_wrap=True)


def _counts(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise InputError(f"--train-extra-rois {text!r} must be comma-separated integers, e.g. 8,12") from None
