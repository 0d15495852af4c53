"""``build_qa``: hierarchical QA data from a feature job, with facts from truth or from an LLM.

Per slide:

1. ROIs grown over the patch graph (:mod:`slidevl.vqa.roi`);
2. 10x and 20x windows cut by physical size around the ROI centres, over tissue
   (:mod:`slidevl.vqa.windows`);
3. facts of the slide, each ROI and each window from a :class:`~slidevl.vqa.facts.FactsSource`:
   a synthetic cohort's ``truth.json`` and label maps where the job has one, else a
   vision-language model shown each image (:mod:`slidevl.vqa.facts_llm`);
4. template questions and captions, WSI -> ROI -> patch (:mod:`slidevl.vqa.templates`);
5. in ``llm`` mode, captions and open answers rewritten through an OpenAI-compatible
   endpoint, each level given the caption of the level above (:mod:`slidevl.vqa.chain`).

Patients are split into train and test (the held-out benchmark), stratified by grade
when the cohort allows, so no patient is in both. Training slides can get more region
questions than the benchmark asks (``train_extra_k``): each extra ROI count partitions
the slide again and adds those ROIs' questions, so a slide teaches more boxes and their
answers, while the test records stay exactly what ``k_rois`` alone gives. They can also get
fields of a single feature patch (``train_patch_fields`` per slide), asked only their
choice questions: what tissue a patch holds is the per-patch evidence that region
fractions add up, and ROI questions alone teach it only through the sum. And their ROIs can
be asked the slide's binned share questions (``train_slide_scale``): a slide answers each of
those once, so the bins of tumour burden, necrosis and lymphocytes are otherwise learned
from one example per training slide. Outputs in ``out``::

    train.jsonl, test.jsonl     VQA records (slidevl.qa.records contract)
    rois/<slide>.json           ROIs in the viewer's format plus geometry, composition, windows
    summary.json                counts per split/level/format/category, letter balance,
                                blind baselines, ROI/window statistics, LLM statistics
    llm_failures.json           LLM mode only: units whose reply could not be used
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from sklearn.model_selection import train_test_split

from slidevl.atomic import write_json_atomic
from slidevl.config import Config, setting
from slidevl.errors import InputError
from slidevl.features.store import FeatureStore, FeatureStoreError
from slidevl.llmclient import LLMClient
from slidevl.qa.records import CHOICE_FORMATS, TEXT_FORMATS, VQARecord, write_records
from slidevl.vqa import build_summary
from slidevl.vqa.chain import ChainReport, run_chain
from slidevl.vqa.facts import FactsError, FactsSource, TruthFacts, find_cohort
from slidevl.vqa.roi import METHODS, ROI, grow_rois
from slidevl.vqa.templates import Unit, Writer, patch_records, pct, roi_records, slide_scale_records, wsi_records
from slidevl.vqa.templates_facts import TISSUE_NAMES, SlideFacts
from slidevl.vqa.windows import DEFAULT_WINDOWS, Window, WindowSpec, plan_patch_fields, plan_windows

MODES: tuple[str, ...] = ("template", "llm")


class BuildError(InputError):
    """The inputs of a QA build are unusable; the message names the file and the fix."""


@dataclass(frozen=True)
class BuildConfig(Config):
    """Everything that decides what :func:`build_qa` writes."""

    k_rois: int = setting(4, min=1, help="ROIs grown per slide (at least one per tissue piece).")
    # The three extra-training-question settings default to the best measured recipe (recipes/vqa.yaml,
    # benchmarks/results/vqa_ss_fresh_3ep.md): about 3.7x the training records, test.jsonl unchanged.
    train_extra_k: tuple[int, ...] = setting(
        (11,),
        help="More ROI counts for training slides only, e.g. 8,12 ('' for none): each partitions the slide again and "
             "adds those region questions to train.jsonl; test.jsonl is unchanged.")
    train_patch_fields: int = setting(
        40, min=0,
        help="Fields of one feature patch each, drawn per training slide, asked their choice questions only "
             "(dominant tissue, tissues present, grade): per-patch supervision (0 for none); test.jsonl is unchanged.")
    train_slide_scale: bool = setting(
        True,
        help="Also ask every training ROI the slide's binned share questions (tumour burden, necrosis, lymphocytes), "
             "so their bins are learned from many boxes, not one answer per slide; test.jsonl is unchanged.")
    roi_method: str = setting("prim", help="ROI growth: prim (cosine to ROI mean) or mst.")
    windows: tuple[WindowSpec, ...] = setting(
        DEFAULT_WINDOWS,
        help="Patch-level field of view as SCALE:PIXELS, repeatable (default: 10x:512 and 20x:512).")
    min_window_tissue: float = setting(0.5, help="Least tissue fraction of a window.")
    mode: str = setting("template", help="template (texts from the facts' templates) or llm (texts rewritten by --llm-model).")
    test_fraction: float = setting(0.25, help="Share of patients held out as the test benchmark.")
    seed: int = setting(0, help="Seed of ROI seeds, the split and question shuffling.")
    encoder: str | None = setting(None, help="Feature encoder folder in the job (if several).")

    def __post_init__(self) -> None:
        if self.k_rois < 1:
            raise BuildError(f"--k-rois must be >= 1, got {self.k_rois}")
        extra = list(self.train_extra_k)
        if any(k < 1 for k in extra) or len(set(extra)) != len(extra) or self.k_rois in extra:
            raise BuildError(
                f"--train-extra-rois {','.join(map(str, extra))} must be distinct counts >= 1 other than "
                f"--k-rois {self.k_rois} (the same count would grow the same ROIs again)"
            )
        if self.train_patch_fields < 0:
            raise BuildError(f"--train-patch-fields must be >= 0, got {self.train_patch_fields}")
        if self.roi_method not in METHODS:
            raise BuildError(f"--roi-method {self.roi_method!r} is not one of {', '.join(METHODS)}")
        if self.mode not in MODES:
            raise BuildError(f"--mode {self.mode!r} is not one of {', '.join(MODES)}")
        if not 0.0 < self.test_fraction < 1.0:
            raise BuildError(f"--test-fraction must lie strictly between 0 and 1, got {self.test_fraction}")
        if not 0.0 <= self.min_window_tissue <= 1.0:
            raise BuildError(f"--min-window-tissue must lie in [0, 1], got {self.min_window_tissue}")
        if not self.windows:
            raise BuildError("at least one window (--window 20x:512) is needed for patch-level questions")
        if len({w.name for w in self.windows}) != len(self.windows):
            raise BuildError(f"window names repeat: {[w.name for w in self.windows]}")



@dataclass
class BuildReport:
    """What :func:`build_qa` wrote."""

    out: Path
    train: Path
    test: Path
    rois_dir: Path
    summary_path: Path
    summary: dict[str, Any]
    failures_path: Path | None = None
    train_records: list[VQARecord] = field(default_factory=list, repr=False)
    test_records: list[VQARecord] = field(default_factory=list, repr=False)


def split_patients(
    patients: Sequence[str], grades: Sequence[int], test_fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """Patient-level train/test split, stratified by grade when every grade can be split.

    At least one patient lands on each side; the same inputs give the same split.
    """
    ids = sorted(patients)
    if len(ids) < 2:
        raise BuildError(f"a train/test split needs at least 2 patients, the cohort has {len(ids)}")
    grade_of = dict(zip(patients, grades))
    n_test = min(max(1, int(round(test_fraction * len(ids)))), len(ids) - 1)
    labels = [grade_of[p] for p in ids]
    try:
        train, test = train_test_split(ids, test_size=n_test, random_state=seed, stratify=labels)
    except ValueError:
        # Too few patients per grade for stratification (tiny cohorts): plain random split.
        train, test = train_test_split(ids, test_size=n_test, random_state=seed)
    return sorted(train), sorted(test)


def _roi_label(unit: Unit) -> str:
    c = unit.facts.composition  # type: ignore[union-attr]
    return f"{TISSUE_NAMES[c.dominant]} {pct(c.tissue[c.dominant])}"


class _SlideBuild:
    """Units, ROIs and windows of one slide."""

    def __init__(self, slide_id: str, patient_id: str, rois: list[ROI], windows: list[Window],
                 rejected: list[dict[str, Any]]) -> None:
        self.slide_id = slide_id
        self.patient_id = patient_id
        self.rois = rois
        self.extra_rois: list[ROI] = []
        self.windows = windows
        self.fields: list[Window] = []
        self.fields_rejected = 0
        self.rejected = rejected
        self.units: list[Unit] = []


def _build_slide(facts: FactsSource, slide_id: str, store: FeatureStore, config: BuildConfig, *,
                 train: bool) -> _SlideBuild:
    sf = store.load(slide_id, load=("patch",))
    rois = grow_rois(sf, config.k_rois, seed=config.seed, method=config.roi_method)
    windows, rejected = plan_windows(sf, rois, config.windows, min_tissue=config.min_window_tissue)
    build = _SlideBuild(slide_id, facts.patient_of(slide_id), rois, [], rejected)

    writer = Writer(config.seed, slide_id)
    sfacts = facts.slide(slide_id, sf)
    wsi = Unit("WSI", slide_id, slide_id, build.patient_id, None, sfacts)
    wsi.records = wsi_records(writer, wsi)
    build.units.append(wsi)
    regions = _region_units(facts, build, writer, rois, wsi, sfacts)
    for window in windows:
        unit = _window_unit(facts, build, writer, window, regions)
        if isinstance(unit, str):
            build.rejected.append({"roi": window.roi, "window": window.spec.name, "reason": unit})
        elif unit is not None:
            build.windows.append(window)
    if train:
        # After every benchmark unit, so the shared letter deck deals those records the same
        # options whatever the extra partitions are.
        for k in config.train_extra_k:
            extra = [replace(r, id=f"K{k}{r.id}") for r in grow_rois(sf, k, seed=config.seed, method=config.roi_method)]
            build.extra_rois.extend(extra)
            _region_units(facts, build, writer, extra, wsi, sfacts)
        for field_window in plan_patch_fields(sf, rois, config.train_patch_fields, seed=config.seed,
                                              min_tissue=config.min_window_tissue):
            unit = _window_unit(facts, build, writer, field_window, regions, formats=CHOICE_FORMATS)
            if isinstance(unit, str):
                build.fields_rejected += 1
            elif unit is not None:
                build.fields.append(field_window)
        if config.train_slide_scale:
            for unit in build.units:
                if unit.level == "ROI":
                    unit.records.extend(slide_scale_records(writer, unit, "in this region"))
    return build


def _window_unit(facts: FactsSource, build: _SlideBuild, writer: Writer, window: Window, regions: dict[str, Unit],
                 formats: tuple[str, ...] | None = None) -> Unit | str | None:
    """The patch-level unit of ``window`` appended to ``build`` (only its ``formats`` when given);
    None when its ROI was rejected, the reason when its facts cannot be had (no tissue there)."""
    if window.roi not in regions:
        return None
    try:
        wfacts = facts.window(build.slide_id, window)
    except ValueError as exc:  # e.g. the segmentation saw tissue where the label map has none
        return str(exc)
    parent = regions[window.roi]
    unit = Unit("patch", f"{build.slide_id}-{window.id}", build.slide_id, build.patient_id, window.bbox, wfacts,
                parent.key)
    records = patch_records(writer, unit, parent.facts)  # type: ignore[arg-type]
    unit.records = records if formats is None else [r for r in records if r.format in formats]
    build.units.append(unit)
    return unit


def _region_units(facts: FactsSource, build: _SlideBuild, writer: Writer, rois: list[ROI], wsi: Unit,
                  sfacts: SlideFacts) -> dict[str, Unit]:
    """ROI units with their records, appended to ``build``; ROIs whose facts cannot be had are rejected."""
    regions = {}
    for roi in rois:
        try:
            rfacts = facts.region(build.slide_id, roi)
        except ValueError as exc:  # e.g. tissue by segmentation, background in the label map
            build.rejected.append({"roi": roi.id, "reason": str(exc)})
            continue
        unit = Unit("ROI", f"{build.slide_id}-{roi.id}", build.slide_id, build.patient_id, roi.bbox, rfacts, wsi.key)
        unit.records = roi_records(writer, unit, sfacts)
        regions[roi.id] = unit
        build.units.append(unit)
    return regions


def _rois_json(build: _SlideBuild, config: BuildConfig, encoder: str) -> dict[str, Any]:
    units = {u.facts.roi_id: u for u in build.units if u.level == "ROI"}  # type: ignore[union-attr]

    def entry(roi: ROI) -> dict[str, Any]:
        unit = units.get(roi.id)
        label = _roi_label(unit) if unit is not None else "no tissue in the label map"
        out = {"id": roi.id, "bbox": list(roi.bbox), "label": label, **roi.to_dict()}
        if unit is not None:
            out["composition"] = {n: round(v, 4) for n, v in unit.facts.composition.tissue.items()}  # type: ignore[union-attr]
        return out

    rois = [{**entry(roi), "windows": [w.to_dict() for w in build.windows if w.roi == roi.id]} for roi in build.rois]
    return {
        "slide": build.slide_id,
        "rois": rois,
        # Kept apart from "rois" so the viewer draws the benchmark partition only.
        "train_extra_rois": [entry(roi) for roi in build.extra_rois],
        "train_patch_fields": [w.to_dict() for w in build.fields],
        "method": config.roi_method,
        "k": config.k_rois,
        "seed": config.seed,
        "encoder": encoder,
        "windows_rejected": build.rejected,
    }


def facts_source(cohort: str | Path | None, job: str | Path, store: FeatureStore, client: LLMClient | None,
                 slides_root: str | Path | None = None) -> FactsSource:
    """Exact facts from the cohort's ``truth.json`` (given, or found beside the job's slides); else from ``client``.

    ``slides_root`` is where the job's slide files are now, when they moved: the model
    is shown images read from them.
    """
    root = Path(cohort) if cohort is not None else find_cohort(Path(job))
    try:
        if root is not None:
            return TruthFacts(root)
        if client is None:
            raise BuildError(
                f"{job}: its slides come with no truth.json, so the facts must come from a vision-language model: "
                "give --llm-url and --llm-model (an OpenAI-compatible server, see the README section "
                "'VQA data for your own slides'), or --cohort for a synthetic cohort"
            )
        from slidevl.vqa.facts_llm import LLMFacts

        return LLMFacts(Path(job), store, client, None if slides_root is None else Path(slides_root))
    except FactsError as exc:
        raise BuildError(str(exc)) from exc


def build_qa(
    cohort: str | Path | None,
    job: str | Path,
    out: str | Path,
    config: BuildConfig | None = None,
    *,
    client: LLMClient | None = None,
    console: Console | None = None,
    progress: bool = True,
    slides_root: str | Path | None = None,
) -> BuildReport:
    """Build the QA set of the slides of ``job`` (see the module docstring).

    Facts come from ``cohort``'s ``truth.json`` (None: the cohort the job's slides came
    from, if any), else from ``client``'s vision-language model. ``client`` is also
    required in ``llm`` mode. Raises :class:`BuildError` for unusable inputs, before
    anything is written.
    """
    config = config or BuildConfig()
    console = console or Console(stderr=True)
    started = time.perf_counter()
    if config.mode == "llm" and client is None:
        raise BuildError("--mode llm needs --llm-url and --llm-model (an OpenAI-compatible endpoint)")
    out = Path(out)
    try:
        store = FeatureStore(job, config.encoder)
    except FeatureStoreError as exc:
        raise BuildError(str(exc)) from exc
    facts = facts_source(cohort, job, store, client, slides_root)
    try:
        facts.check(Path(job), store)
        strata = facts.patient_strata()
    except FactsError as exc:
        raise BuildError(str(exc)) from exc
    slide_ids = facts.slide_ids()
    train_p, test_p = split_patients(list(strata), list(strata.values()), config.test_fraction, config.seed)

    test_set = set(test_p)
    builds: list[_SlideBuild] = []
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=console, disable=not progress)
    with bar:
        task = bar.add_task("slides", total=len(slide_ids))
        for slide_id in slide_ids:
            bar.update(task, description=f"slides ({slide_id})")
            try:
                builds.append(_build_slide(facts, slide_id, store, config, train=facts.patient_of(slide_id) not in test_set))
            except BuildError:
                raise
            except (FeatureStoreError, ValueError) as exc:
                raise BuildError(f"slide {slide_id}: {exc}") from exc
            bar.advance(task)
        units = [u for b in builds for u in b.units]
        chain: ChainReport | None = None
        if config.mode == "llm":
            assert client is not None
            # Units with choice questions only (training patch fields) have no text to rewrite.
            worded = [u for u in units if any(r.format in TEXT_FORMATS for r in u.records)]
            llm_task = bar.add_task(f"LLM ({client.model})", total=len(worded))
            chain = run_chain(worded, client, on_done=lambda n: bar.advance(llm_task, n))

    for b in builds:
        write_json_atomic(out / "rois" / f"{b.slide_id}.json", _rois_json(b, config, store.encoder))
    records = [r for u in units for r in u.records]
    train_records = [r for r in records if r.meta["patient"] not in test_set]
    test_records = [r for r in records if r.meta["patient"] in test_set]
    train_path = write_records(out / "train.jsonl", train_records)
    test_path = write_records(out / "test.jsonl", test_records)
    failures_path = None
    if chain is not None and chain.failures:
        failures_path = write_json_atomic(out / "llm_failures.json", chain.failures)
    else:
        # A failure list left by an earlier run would describe records this run replaced.
        (out / "llm_failures.json").unlink(missing_ok=True)
    summary = _summary(facts, config, store, builds, train_p, test_p, train_records, test_records, chain,
                       time.perf_counter() - started, job)
    summary_path = write_json_atomic(out / "summary.json", summary)
    return BuildReport(out, train_path, test_path, out / "rois", summary_path, summary, failures_path,
                       train_records, test_records)


def _summary(facts: FactsSource, config: BuildConfig, store: FeatureStore, builds: list[_SlideBuild],
             train_p: list[str], test_p: list[str], train: list[VQARecord], test: list[VQARecord],
             chain: ChainReport | None, seconds: float, job: str | Path) -> dict[str, Any]:
    slides = {b.slide_id: b.patient_id for b in builds}
    described = facts.describe()
    n_rois = [len(b.rois) for b in builds]
    patches = [r.n_patches for b in builds for r in b.rois]
    return {
        "cohort": described.get("cohort"),
        "facts": described,
        "job": str(job),
        "encoder": store.encoder,
        "config": config.to_dict(),
        "n_slides": len(builds),
        "n_patients": len(set(slides.values())),
        "splits": {
            "train": build_summary.split_summary("train", train, train_p, slides),
            "test": build_summary.split_summary("test", test, test_p, slides),
        },
        "counts": build_summary.counts(train + test),
        "blind_baselines_on_test": build_summary.blind_baselines(train, test),
        "rois": {
            "total": int(sum(n_rois)),
            "train_extra": sum(len(b.extra_rois) for b in builds),
            # Benchmark ROIs only, as "total"; extra training ROIs without label tissue are simply not asked about.
            "without_label_tissue": sum(1 for b in builds for x in b.rejected
                                        if "window" not in x and x["roi"] in {r.id for r in b.rois}),
            "per_slide": {"min": int(min(n_rois)), "max": int(max(n_rois))},
            "patches_per_roi": {"min": int(min(patches)), "mean": round(float(np.mean(patches)), 1),
                                "max": int(max(patches))},
        },
        "windows": {
            "kept": sum(len(b.windows) for b in builds),
            "rejected": sum(1 for b in builds for x in b.rejected if "window" in x),
            "train_patch_fields": sum(len(b.fields) for b in builds),
            "train_patch_fields_without_label_tissue": sum(b.fields_rejected for b in builds),
        },
        "llm": chain.to_dict() if chain is not None else None,
        "seconds": round(seconds, 2),
    }
