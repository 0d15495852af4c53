"""``slidevl demo``: the main job on the embedded default, a synthetic demo cohort.

It renders a cohort with planted ground truth, turns its slides into a feature store,
cross-validates HiLa against ABMIL, builds a hierarchical QA set from the planted truth,
trains the slide VQA model on the training patients and scores it on the held-out ones
against answers that never look at the slide, asks one checkable question, and prints
where everything is. The results table also goes to ``summary.json``. Every step is
resumable: a second run reuses what the first one finished.

With a vision-language encoder (``--encoder openclip:DIR`` or ``conch:PATH``, or a CLIP the
demo trains with ``--train-clip``) the survival runs use that model's
features, HiLa embeds its prompts with the same model's text tower (no learned bridge),
and the prompts' zero-shot prognosis (no training) joins the results. The VQA model keeps
reading the hand-crafted job, which the demo then preprocesses as well.
"""

from __future__ import annotations

import json
import os
import resource
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import typer
from rich.console import Console
from rich.table import Table

from slidevl.atomic import write_json_atomic
from slidevl.cpus import available_cpus

#: The demo's topo-pack encoder: 2 layers, 256 wide, keep the demo in minutes on a CPU; the
#: paper's 6 x 512 is the default of `slidevl slidellm pretrain` and of the benchmarks.
DEMO_ENCODER = {"d_model": 256, "n_layers": 2, "n_heads": 4, "ffn_dim": 1024}
#: The VQA recipe's settings at demo size (``recipes/demo.yaml``): everything not named here,
#: the connector first, is the best measured recipe's default (``recipes/vqa.yaml``).
#: The demo's QA build: no extra training questions (see where it is used).
DEMO_QA: dict[str, Any] = {"train_extra_k": (), "train_patch_fields": 0, "train_slide_scale": False}
DEMO_RECIPE = {"mae_steps": 40, "moco_steps": 20, "stage1_epochs": 2, "stage2_epochs": 5, "encoder": DEMO_ENCODER}
#: ``--train-clip`` settings: ClipTrainConfig's measured recipe with fewer tiles and epochs, so
#: that training stays a few CPU-minutes on the demo cohort; ``--clip-epochs`` changes the epochs.
DEMO_CLIP = {"tiles_per_class": 300, "epochs": 8}
#: ``--train-clip`` trains on a cohort of its own, rendered with the demo's seed plus this: none of
#: the patients the survival folds score is seen by the CLIP, whose captions name the grade.
CLIP_COHORT_SEED_OFFSET = 1000
#: WSI question templates whose answer a reader can check on the slide, in order of preference.
ASK_TEMPLATES = ("grade", "dominant")


def _cohort_ready(cohort_dir: Path) -> bool:
    return (cohort_dir / "truth.json").is_file() and (cohort_dir / "clinical.csv").is_file()


def idle_cpus() -> int:
    """The CPUs this process may use less those other work keeps busy now (1-minute load average), at least 1."""
    return max(1, available_cpus() - round(os.getloadavg()[0]))


def _cpu_seconds() -> float:
    """User + system CPU time of this process and of its finished children (the preprocessing workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class StepTimes:
    """Wall and CPU seconds of each step, and of the whole run from this object's creation."""

    def __init__(self) -> None:
        self.steps: dict[str, tuple[float, float]] = {}
        self._start = (time.perf_counter(), _cpu_seconds())

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        wall, cpu = time.perf_counter(), _cpu_seconds()
        yield
        self.steps[name] = (time.perf_counter() - wall, _cpu_seconds() - cpu)

    def as_dict(self) -> dict[str, Any]:
        """``{"steps": {name: {"wall_s", "cpu_s"}}, "wall_s", "cpu_s"}``, rounded to 0.1 s."""
        return {
            "steps": {name: {"wall_s": round(w, 1), "cpu_s": round(c, 1)} for name, (w, c) in self.steps.items()},
            "wall_s": round(time.perf_counter() - self._start[0], 1),
            "cpu_s": round(_cpu_seconds() - self._start[1], 1),
        }


def demo_command(
    out: Path = typer.Option(Path("demo"), "--out", help="Folder for the cohort, the job and the runs."),
    patients: int = typer.Option(
        30, "--patients", min=20,
        help="Patients in the synthetic cohort (>= 20, so each of the 5 folds has events). Every step grows with "
             "them; the VQA scores do too: a quarter of them are held out, so the whole-slide questions are learned "
             "from one answer per training slide.",
    ),
    slide_px: int = typer.Option(
        4096, "--slide-px",
        help="Level-0 width of each synthetic slide (0.5 µm/px). 4096: 55 CPU-s to render the 38 slides and 40 to "
             "preprocess them; 20000: about 13 CPU-s to render each slide (8 min) and 24 times the pixels to preprocess.",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the cohort and of every model."),
    epochs: int = typer.Option(
        20, "--epochs",
        help="Training epochs of the survival models: per epoch and fold, about 0.85 CPU-s for HiLa and 0.4 for "
             "ABMIL on 30 patients (20 epochs: 2 CPU-min for both 5-fold runs).",
    ),
    grad_accum: int = typer.Option(
        1, "--grad-accum", min=1,
        help="Patients per optimizer step of the survival models. The paper's 32 suits cohorts of hundreds; "
             "with 24 training patients it would leave one step per epoch.",
    ),
    vqa: bool = typer.Option(
        True, "--vqa/--no-vqa",
        help="Also build the QA set and train and score the slide VQA model: 10.1 of the demo's 11.3 minutes on a "
             "quiet 2-core machine (training 8.5, answering the held-out questions 0.9, the other-slide control 0.6).",
    ),
    encoder: str = typer.Option(
        "handcrafted", "--encoder",
        help="Tile encoder of the survival runs, and of the VQA model unless it has a text tower. A vision-language "
             "one (openclip:DIR, conch:PATH) also embeds HiLa's prompts with its own text tower (no MiniLM bridge) "
             "and adds their zero-shot prognosis (no training) to the results; the VQA model then keeps the "
             "hand-crafted features, preprocessed too. Measured on 30 patients, "
             "2 cores under load 7-9: openclip:DIR of a 3-layer, 128-wide CLIP (`slidevl encoders train-clip`'s "
             "default) with --no-vqa: 2.5 CPU-min in all, 4.6 min wall (cohort 34 CPU-s, CLIP features 34, ABMIL 22, HiLa "
             "55, zero-shot 1).",
    ),
    train_clip_first: bool = typer.Option(
        False, "--train-clip",
        help="First train a CLIP (`slidevl encoders train-clip`, captions from the planted truth) on a separate "
             "cohort of as many patients (seed + 1000, in OUT/clip_data: no survival patient is seen), print its "
             "zero-shot tissue accuracy on that cohort's held-out patients, and use it as --encoder. Measured with "
             "--patients 20 --no-vqa under load 9-11: training (977 tiles, 8 epochs) 66 CPU-s; the CLIP's own "
             "cohort and its hand-crafted features add about as much as the demo cohort's.",
    ),
    clip_epochs: int = typer.Option(DEMO_CLIP["epochs"], "--clip-epochs", min=1,
                                    help="Epochs of --train-clip (the cost grows in proportion)."),
    threads: int = typer.Option(
        0, "--threads", min=0,
        help="Torch threads; 0: the cores not already busy when the demo starts (cores minus the 1-minute load "
             "average, at least 1). A thread on a core that another job keeps busy stalls the others at every step.",
    ),
) -> None:
    """Synthetic cohort → features → survival CV → slide VQA, with every output path printed."""
    # Imported here so that `slidevl --help` does not pay for torch and friends.
    import torch

    from slidevl.features.config import PreprocessConfig
    from slidevl.features.encoders.text import is_aligned_spec, normalise_encoder_spec
    from slidevl.survival.cv import CVConfig, run_cv
    from slidevl.survival.report import print_cv_table
    from slidevl.synth.cohort import make_cohort

    console = Console()
    if train_clip_first and encoder != "handcrafted":
        raise typer.BadParameter("--train-clip trains the encoder; leave --encoder out", param_hint="--encoder")
    aligned = train_clip_first or is_aligned_spec(encoder)
    torch.set_num_threads(threads or idle_cpus())
    console.print(f"[dim]{torch.get_num_threads()} torch thread(s)[/]")
    timings = StepTimes()
    cohort_dir, job_dir, runs_dir = out / "cohort", out / "job", out / "runs"

    with timings.step("synthetic cohort"):
        if _cohort_ready(cohort_dir):
            console.print(f"[dim]cohort already in {cohort_dir}, reusing it[/]")
        else:
            make_cohort(cohort_dir, n_patients=patients, seed=seed, slide_px=slide_px, overwrite=cohort_dir.exists())

    report = None
    # This job feeds the VQA model and, with an encoder that has no text tower, the survival runs.
    if vqa or not aligned:
        config = PreprocessConfig() if aligned else PreprocessConfig(encoder=encoder)
        report = _preprocess_step(cohort_dir, job_dir, config, "preprocess", console, timings)
    clip_report = None
    if train_clip_first:
        encoder, clip_report = _train_clip_step(out, patients, seed, slide_px, clip_epochs, console, timings)
    survival_job, text_encoder = job_dir, None
    if aligned:
        encoder = normalise_encoder_spec(encoder)
        survival_job, text_encoder = out / "job-aligned", encoder
        step = "preprocess" if report is None else "preprocess: aligned encoder"
        report = _preprocess_step(cohort_dir, survival_job, PreprocessConfig(encoder=encoder), step, console, timings)

    summaries = {}
    for model in ("abmil", "hila"):
        # HiLa's prompts: the encoder's own text tower when it has one, else the default (MiniLM, bridged).
        text = {"text_encoder": text_encoder} if text_encoder and model == "hila" else {}
        config = CVConfig(features=survival_job, clinical=cohort_dir / "clinical.csv", splits=cohort_dir / "splits",
                          out=runs_dir / model, model=model, epochs=epochs, seed=seed, grad_accum=grad_accum,
                          encoder=report.feature_dir.name, **text)
        with timings.step(f"survival cv: {model}"):
            # resume: a finished run is reused, an interrupted one continues from its finished folds.
            summaries[model] = run_cv(config, console=console, resume=True)
    print_cv_table(list(summaries.values()), console=console, title="Demo cohort: 5-fold cross-validation (final epoch)")
    console.print(f"HiLa's prompts were embedded in the text space [bold]{summaries['hila']['text_space']}[/]")

    zero_shot = None
    if text_encoder:
        from slidevl.survival.zeroshot import zero_shot_prognosis

        with timings.step("zero-shot prognosis"):
            found = zero_shot_prognosis(survival_job, cohort_dir / "clinical.csv", text_encoder)
        zero_shot = {k: found[k] for k in ("c_index", "n_patients", "n_events", "text_space", "prompts")}

    vqa_results, vqa_paths = (None, {})
    if vqa:
        # The benchmark's questions only: the recipe's extra training questions (the QA build's default,
        # `--train-extra-rois 11 --train-patch-fields 40 --train-slide-scale`) give 3.7 times the training
        # records and VQA training time, beyond the demo's minutes.
        vqa_results, vqa_paths = vqa_steps(cohort_dir, job_dir, out / "qa", runs_dir / "vqa", console, timings,
                                           recipe={**DEMO_RECIPE, "seed": seed}, qa=DEMO_QA | {"seed": seed})

    results = {
        "settings": {"patients": patients, "slide_px": slide_px, "seed": seed, "survival_epochs": epochs,
                     "encoder": encoder, "train_clip": clip_report,
                     "torch_threads": torch.get_num_threads(),
                     "grad_accum": grad_accum, "vqa_recipe": DEMO_RECIPE if vqa else None},
        "survival": {**_survival_results(summaries, cohort_dir / "truth.json"),
                     "hila_text_space": summaries["hila"]["text_space"], "zero_shot": zero_shot},
        "vqa": vqa_results,
        "time": timings.as_dict(),
    }
    write_json_atomic(out / "summary.json", results)
    console.print(results_table(results))

    table = Table(title="Where things are", show_header=False)
    table.add_row("results table (this run)", str(out / "summary.json"))
    table.add_row("slides, clinical.csv, splits/, truth.json", str(cohort_dir))
    if survival_job != job_dir and (job_dir / "features").is_dir():
        table.add_row("hand-crafted feature store (VQA)", str(job_dir / "features" / "handcrafted"))
    if train_clip_first:
        table.add_row("trained CLIP (report.json) / its cohort", f"{out / 'clip'}  /  {out / 'clip_data'}")
    table.add_row("feature store", str(report.feature_dir))
    table.add_row("tissue GeoJSON / QC pictures", f"{survival_job / 'tissue'}  /  {survival_job / 'qc'}")
    table.add_row("manifest / summary", f"{report.manifest}  /  {report.summary}")
    for model in ("abmil", "hila"):
        table.add_row(f"{model} run (summary.json, km.png)", str(runs_dir / model))
    for name, path in vqa_paths.items():
        table.add_row(name, str(path))
    console.print(table)

    console.print(_timings_table(results["time"]))
    serve = f".venv/bin/slidevl serve {survival_job} --survival-run {runs_dir / 'hila'}"
    vqa_options = f" --rois {vqa_paths['QA ROIs']} --vqa-checkpoint {vqa_paths['VQA checkpoint']}" if vqa_paths else ""
    if vqa_paths and survival_job != job_dir:
        # The VQA model reads the hand-crafted features: its chat is served on that job.
        console.print(f"VQA chat:  [bold].venv/bin/slidevl serve {job_dir}{vqa_options}[/]", soft_wrap=True)
        vqa_options = ""
    console.print(f"Look at it:  [bold]{serve}{vqa_options}[/]", soft_wrap=True)


def _preprocess_step(cohort_dir: Path, job: Path, config: Any, step: str, console: Console, timings: StepTimes) -> Any:
    """The cohort's slides into ``job`` with ``config`` (a finished job is reused); exits on failed slides."""
    from slidevl.features.pipeline import preprocess

    with timings.step(step):
        report = preprocess(cohort_dir / "slides", job, config, console=console)
    if report.exit_code:
        console.print(f"[red]{report.n_failed} slide(s) failed to preprocess[/]; see {report.summary}")
        raise typer.Exit(report.exit_code)
    return report


def _train_clip_step(out: Path, patients: int, seed: int, slide_px: int, epochs: int, console: Console,
                     timings: StepTimes) -> tuple[str, dict[str, Any]]:
    """A CLIP trained on a cohort of its own (reused when its report exists): its ``openclip:`` spec and a report digest."""
    from slidevl.features.config import PreprocessConfig
    from slidevl.features.encoders.clip_train import REPORT_FILE, ClipTrainConfig, train_clip
    from slidevl.synth.cohort import make_cohort

    clip_dir, data = out / "clip", out / "clip_data"
    report_path = clip_dir / REPORT_FILE
    if report_path.is_file():
        console.print(f"[dim]CLIP already in {clip_dir}, reusing it[/]")
        report = json.loads(report_path.read_text())
    else:
        cohort_dir = data / "cohort"
        with timings.step("CLIP's cohort"):
            if not _cohort_ready(cohort_dir):
                make_cohort(cohort_dir, n_patients=patients, seed=seed + CLIP_COHORT_SEED_OFFSET, slide_px=slide_px,
                            overwrite=cohort_dir.exists())
        # The CLIP's tiles are the kept patches of a hand-crafted job on its cohort.
        _preprocess_step(cohort_dir, data / "job", PreprocessConfig(), "preprocess: CLIP's cohort", console, timings)
        with timings.step("train CLIP"):
            config = ClipTrainConfig(**{**DEMO_CLIP, "epochs": epochs, "seed": seed})
            report = train_clip(cohort_dir, data / "job", clip_dir, config, log=console.print)
    check = report["zero_shot_heldout"]
    console.print(f"CLIP zero-shot tissue accuracy on {check['n_tiles']} tiles of {len(report['heldout_patients'])} "
                  f"held-out patients of its own cohort: [bold]{check['accuracy']:.3f}[/] (5 classes, chance 0.2)")
    digest = {"dir": str(clip_dir), "epochs": report["config"]["epochs"], "n_train_tiles": report["n_train_tiles"],
              "heldout_patients": report["heldout_patients"], "zero_shot_tissue_accuracy": check["accuracy"]}
    return f"openclip:{clip_dir}", digest


def _timings_table(times: dict[str, Any]) -> Table:
    table = Table(title="Timings (CPU: all cores, workers included)")
    table.add_column("step")
    table.add_column("wall s", justify="right")
    table.add_column("CPU s", justify="right")
    for step, t in times["steps"].items():
        table.add_row(step, f"{t['wall_s']:.1f}", f"{t['cpu_s']:.1f}")
    table.add_row("[bold]total[/]", f"{times['wall_s']:.1f}", f"{times['cpu_s']:.1f}")
    return table


def _survival_results(summaries: dict[str, dict[str, Any]], truth: Path) -> dict[str, Any]:
    """Cross-validated C-index per model, and that of the planted risk itself (the ceiling)."""
    out: dict[str, Any] = {
        model: {"c_index_mean": s["c_index"]["mean"], "c_index_std": s["c_index"]["std"], "folds": s["c_index"]["folds"]}
        for model, s in summaries.items()
    }
    out["oracle_c_index"] = json.loads(truth.read_text())["survival_model"]["oracle_c_index"]
    return out


def results_table(results: dict[str, Any]) -> Table:
    """Survival C-index and held-out VQA single-choice accuracy, each beside what it is to be read against.

    The VQA controls never see the question's own slide: the same model given another slide's
    visual input, the option most often right in training, and a uniform guess. Two more
    columns give the VQA rows on the spatial questions and on the others apart.
    """
    vqa = results["vqa"]
    kinds = (vqa or {}).get("by_kind", {})
    table = Table(title="Demo results")
    table.add_column("task")
    table.add_column("model / control")
    table.add_column("score", justify="right")
    for kind, part in kinds.items():
        table.add_column(f"{kind} ({part['n']})", justify="right")
    survival = results["survival"]
    for task, (model, name) in zip(("survival: C-index", "(5-fold CV)"), (("abmil", "ABMIL"), ("hila", "HiLa"))):
        s = survival[model]
        score = "undefined" if s["c_index_mean"] is None else f"{s['c_index_mean']:.3f} ± {s['c_index_std']:.3f}"
        table.add_row(task, name, score)
    zero_shot = survival.get("zero_shot")
    if zero_shot is not None:
        c = zero_shot["c_index"]
        table.add_row("", "zero-shot prompts (no training)", "undefined" if c is None else f"{c:.3f}")
    table.caption = f"HiLa's prompts embedded in: {survival['hila_text_space']}"
    oracle = survival["oracle_c_index"]
    table.add_row("", "planted risk (oracle)", "n/a" if oracle is None else f"{oracle:.3f}",
                  end_section=True)
    if vqa is not None:
        rows = (("VQA: single-choice", "model", "model"), ("accuracy on", "model, another slide's image", "other_slide"),
                (f"{vqa['n_single']} held-out", "most common train answer", "majority"), ("questions", "chance", "chance"))
        for task, name, key in rows:
            table.add_row(task, name, f"{vqa[key]:.3f}", *(f"{part[key]:.3f}" for part in kinds.values()))
    return table


def vqa_steps(cohort_dir: Path, job_dir: Path, qa_dir: Path, run_dir: Path, console: Console, timings: StepTimes, *,
              recipe: dict[str, Any], qa: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Path]]:
    """QA set from the planted truth → VQA training → answers and scores on held-out patients, and controls.

    ``recipe`` are :class:`RecipeSizes` fields, ``qa`` :class:`BuildConfig` fields.
    """
    from slidevl.qa.records import read_records, write_records
    from slidevl.slidellm.ask import SlideAssistant
    from slidevl.slidellm.recipe import RecipeSizes, train_vqa
    from slidevl.vqa.build import BuildConfig, build_qa
    from slidevl.vqa.controls import answer_with_other_slides, blind_single_choice
    from slidevl.vqa.evaluate import evaluate, report_table
    from slidevl.vqa.predict import predict_records
    from slidevl.vqa.predictions import write_predictions

    with timings.step("VQA: build QA"):
        if (qa_dir / "test.jsonl").is_file():
            console.print(f"[dim]QA set already in {qa_dir}, reusing it[/]")
        else:
            build_qa(cohort_dir, job_dir, qa_dir, BuildConfig(**qa), console=console)

    with timings.step("VQA: pretrain + tune"):
        trained = train_vqa(job_dir, qa_dir, run_dir, RecipeSizes(**recipe))

    with timings.step("VQA: answer + score test set"):
        assistant = SlideAssistant(trained.stage2, cache_root=run_dir / "ask_cache")
        predictions = run_dir / "predictions.jsonl"
        # A finished file is reused as is; an interrupted run continues from its partial file.
        predict_records(assistant, qa_dir / "test.jsonl", predictions, job=job_dir, console=console, resume=True)
        report = evaluate(predictions, qa_dir / "test.jsonl", out=run_dir / "metrics.json")
    console.print(report_table(report))

    # The controls: the same single-choice questions answered blind, and with another slide's visual input.
    with timings.step("VQA: another slide's visual input"):
        test = read_records(qa_dir / "test.jsonl")
        single = [r for r in test if r.format == "single"]
        train = read_records(qa_dir / "train.jsonl")
        blind = blind_single_choice(train, test)
        single_gold = write_records(run_dir / "test_single.jsonl", single)
        other_path = run_dir / "predictions_other_slide.jsonl"
        if not other_path.is_file():
            answers = answer_with_other_slides(assistant, single, job=job_dir, console=console)
            write_predictions(other_path, {r.id: a for r, a in zip(single, answers)})
        other = evaluate(other_path, single_gold, out=run_dir / "metrics_other_slide.json")
    results = {
        "n_single": len(single),
        "model": report["by_format"]["single"]["accuracy"],
        "other_slide": other["by_format"]["single"]["accuracy"],
        "majority": blind["majority"],
        "chance": blind["chance"],
        "by_kind": _single_by_kind(single, train, report, other),
        "overall_accuracy": report["overall"]["accuracy"],
        "ask": _ask_example(assistant, test, job_dir, trained.stage2, console),
    }
    return results, {
        "QA train/test.jsonl, summary.json": qa_dir,
        "QA ROIs": qa_dir / "rois",
        "VQA checkpoint": trained.stage2,
        "VQA predictions / metrics": run_dir / "metrics.json",
        "VQA with another slide's visual input": run_dir / "metrics_other_slide.json",
    }


def _single_by_kind(single: list[Any], train: list[Any], report: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """The single-choice numbers and controls of the spatial questions and of the others, apart.

    Spatial answers depend on where tissue lies, the others on what and how much there is;
    the two are read against different baselines, so the demo shows them separately.
    """
    from slidevl.vqa.controls import blind_single_choice

    model = {row["id"]: row["score"] for row in report["records"] if row["format"] == "single"}
    shuffled = {row["id"]: row["score"] for row in other["records"]}
    kinds: dict[str, Any] = {}
    for kind, records in (("not spatial", [r for r in single if r.category != "spatial"]),
                          ("spatial", [r for r in single if r.category == "spatial"])):
        if records:
            blind = blind_single_choice(train, records)
            kinds[kind] = {"n": len(records), "model": sum(model[r.id] for r in records) / len(records),
                           "other_slide": sum(shuffled[r.id] for r in records) / len(records),
                           "majority": blind["majority"], "chance": blind["chance"]}
    return kinds


def _ask_example(assistant: Any, test: list[Any], job_dir: Path, checkpoint: Path, console: Console) -> dict[str, Any] | None:
    """One held-out whole-slide single-choice question, asked as ``slidevl ask`` asks it, beside its truth."""
    from rich.markup import escape

    from slidevl.qa.records import render_options
    from slidevl.vqa.choices import format_letters, parse_choice

    wsi = [r for r in test if r.level == "WSI" and r.format == "single"]
    preferred = [r for template in ASK_TEMPLATES for r in wsi if r.meta.get("template") == template]
    record = next(iter(preferred or wsi), None)
    if record is None:
        return None
    options = render_options(record.options)
    # The options go into the question text, as they do in training and on `slidevl ask`'s command line.
    answer = assistant.conversation(assistant.open_slide(record.slide, job=job_dir)).ask("\n".join([record.question, *options]))
    chosen = format_letters(parse_choice(answer, record.options))
    truth = options[ord(record.answer) - ord("A")]
    verdict = "[green]right[/]" if chosen == record.answer else "[red]wrong[/]"
    console.print(f"[bold]slidevl ask {record.slide}[/] --checkpoint {checkpoint} --job {job_dir}\n"
                  f"  {escape(record.question)}\n" + "".join(f"    {escape(o)}\n" for o in options)
                  + f"  model: {escape(repr(answer))} -> {chosen or 'no option read'}\n  truth: {escape(truth)}   {verdict}",
                  markup=True, highlight=False, soft_wrap=True)
    return {"slide": record.slide, "question": record.question, "options": list(record.options), "answer": answer,
            "chosen": chosen, "truth": record.answer, "correct": chosen == record.answer}
