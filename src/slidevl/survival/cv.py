"""Honest k-fold cross-validation of one survival model.

Per fold: fit the bins (on the whole cohort or the training fold only), train for a
fixed number of epochs, evaluate the final model on the validation patients — no
checkpoint selection on validation data — and save it. Across folds: mean ± std of
the validation C-index, out-of-fold risks, and a Kaplan–Meier plot of the high/low
risk groups (median split of the pooled out-of-fold risks) with the log-rank test.

The whole input is checked first (:mod:`.validate`), and options left unset are fitted
to the cohort. Outputs in ``out``: ``summary.json``, ``oof_risks.csv``, ``km.png``,
``fold_k/{model.safetensors,config.json,result.json}``, ``evidence/<slide>.json`` and
``run_state.json``, which lets an interrupted run resume from its finished folds
(:mod:`.runfolder`). A fold whose validation patients have no comparable pair has an
undefined C-index: recorded as ``null`` and left out of the mean.

Under ``accelerate launch`` with N processes, training is data-parallel
(:mod:`.train`), each process predicts a contiguous share of the validation patients
and the shares are gathered in process order, so the C-index, the out-of-fold risks
and the evidence cover every validation patient; only the main process writes files
or prints.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

import slidevl
from slidevl.atomic import atomic_path, write_json_atomic
from slidevl.config import Config, setting
from slidevl.errors import ConfigError
from slidevl.features.encoders.text import normalise_encoder_spec
from slidevl.features.store import FeatureStoreError
from slidevl.survival.checkpoint import save_checkpoint
from slidevl.survival.cohort import ClinicalColumns, Cohort
from slidevl.survival.data import REGION_TOKEN_MODES, BagCache
from slidevl.survival.evidence import prompt_table, slide_evidence, write_evidence
from slidevl.survival.folds import Fold, write_folds
from slidevl.survival.hila.prompts import (
    DEFAULT_TEXT_ENCODER,
    encode_bank,
    is_aligned,
    load_prompt_bank,
    text_space_options,
)
from slidevl.survival.labels import SurvivalBins, fit_bins
from slidevl.survival.metrics import c_index, plot_km, stratify
from slidevl.survival.models.base import SurvivalModel
from slidevl.survival.registry import SURVIVAL_MODELS, build_model, list_survival_models
from slidevl.survival.runfolder import RunFolder, file_sha256
from slidevl.survival.scaling import FeatureScaler
from slidevl.survival.train import BagDataset, PatientRecord, TrainConfig, make_accelerator, predict_bag, train_model
from slidevl.survival.validate import CVPlan, plan_cv

BINS_MODES = ("all", "train")


def auto_int(text: str) -> int | None:
    """``auto`` → None (fitted to the cohort), else a positive integer: how ``--grad-accum`` is read."""
    if text == "auto":
        return None
    try:
        number = int(text)
    except ValueError:
        number = 0
    if number < 1:
        raise ValueError(f"expects a positive integer or auto, got {text!r}")
    return number


@dataclass
class CVConfig(Config):
    """Everything that defines a cross-validation run (recorded in ``summary.json``).

    ``k``, ``n_bins`` and ``grad_accum`` left at ``None`` are fitted to the cohort
    (:mod:`slidevl.survival.validate`); the values used are in the summary's ``settings``.
    """

    features: Path = setting(help="Job folder with features/<encoder>/<slide>.h5.")
    clinical: Path = setting(help="CSV with one row per slide: slide id, patient id, event, time.")
    out: Path = setting(help="Run folder to write (new or empty; see --overwrite and --resume).")
    model: str = setting("hila", help="meanpool, abmil, transmil or hila.")
    splits: Path | None = setting(None, help="Folder of splits_{k}.csv; omitted: make event-stratified folds.")
    k: int | None = setting(None, help="Number of folds when making splits (default: 5, fewer when the cohort has fewer events).")
    epochs: int = setting(20, help="Training epochs per fold.")
    seed: int = setting(0, help="Seed of the folds, the model's initialisation and the patient order.")
    lr: float = setting(2e-4, help="AdamW learning rate.")
    weight_decay: float = setting(1e-5, help="AdamW weight decay.")
    grad_accum: int | None = setting(
        None, parser=auto_int, metavar="INT|auto",
        help="Patients per optimiser step, or auto (the default): min(32, max(1, n_train // 32)), i.e. at least 32 steps per epoch.")
    alpha: float = setting(0.0, help="NLL weight of the uncensored term.")
    n_bins: int | None = setting(
        None, help="Survival bins (default: 4, fewer when the uncensored times allow fewer distinct edges).")
    bins_mode: str = setting("all", help="all: MCAT bins on the whole cohort; train: on each training fold.")
    variant: str = setting("full", help="HiLa: full, A (single prompt), B (no CLP), C (no MCL), D (patch only).")
    prompts: str = setting("synthetic", help="Prompt bank: synthetic, brca, luad, ucec or a JSON path.")
    text_encoder: str = setting(
        DEFAULT_TEXT_ENCODER,
        help="minilm (embedded), clip:/path/to/text_tower, or the text tower of the features' own model: conch:/path/to/CONCH "
             "or openclip:DIR|ARCH@CKPT (prompts then share the features' space: no learned bridge, no standardising).")
    region_tokens: str = setting("auto", help="auto, store (region/features) or pooled (mean of patches).")
    encoder: str | None = setting(None, help="Feature encoder folder when the job has several.")
    skip_missing: bool = setting(False, help="Leave out slides without features instead of failing.")
    device: str = setting("auto", help="auto, cpu or cuda.")
    # Typed as repeated --option key=value on the command line (see slidevl.survival.cli).
    model_options: dict[str, Any] = setting(default_factory=dict, cli=False, help="Model hyper-parameters, e.g. {dim: 128}.")
    standardize: bool = setting(True, help="Standardise features on each training fold.")
    evidence: bool = setting(True, help="Write evidence/<slide>.json.")
    max_cache_bytes: int | None = setting(None, cli=False, help="Memory for cached feature bags (default: sized to the machine).")
    columns: ClinicalColumns = setting(default_factory=ClinicalColumns, help="The clinical table's layout.")

    def __post_init__(self) -> None:
        self.features, self.clinical, self.out = Path(self.features), Path(self.clinical), Path(self.out)
        self.splits = None if self.splits is None else Path(self.splits)
        if self.model not in SURVIVAL_MODELS:
            raise ConfigError(f"--model must be one of {list_survival_models()}, got {self.model!r}")
        if self.bins_mode not in BINS_MODES:
            raise ConfigError(f"--bins-mode must be one of {BINS_MODES}, got {self.bins_mode!r}")
        if self.region_tokens not in REGION_TOKEN_MODES:
            raise ConfigError(f"--region-tokens must be one of {REGION_TOKEN_MODES}, got {self.region_tokens!r}")
        if self.epochs < 1 or (self.grad_accum or 1) < 1 or (self.k or 2) < 2 or (self.n_bins or 1) < 1:
            raise ConfigError(
                f"need --epochs >= 1, --grad-accum >= 1, --k >= 2 and --n-bins >= 1 "
                f"(got {self.epochs}, {self.grad_accum}, {self.k}, {self.n_bins})"
            )
        variants = self.model_class.variants
        if variants and self.variant not in variants:
            raise ConfigError(f"--variant must be one of {list(variants)} for --model {self.model}, got {self.variant!r}")
        if not variants and self.variant != "full":
            with_variants = ", ".join(name for name, cls in SURVIVAL_MODELS.items() if cls.variants)
            raise ConfigError(f"--variant applies to {with_variants} only; got --model {self.model} --variant {self.variant}")
        if self.model_class.needs_prompts:
            self.text_encoder = normalise_encoder_spec(self.text_encoder)
            # Prompts from the features' own model are compared with the raw features;
            # standardising would move the features out of that space.
            if is_aligned(self.text_encoder):
                self.standardize = False

    @property
    def model_class(self) -> type[SurvivalModel]:
        """The registered class of ``model``: what it needs (prompts) and gives (evidence, variants)."""
        return SURVIVAL_MODELS.get(self.model)

    def train_config(self, grad_accum: int) -> TrainConfig:
        return TrainConfig(self.epochs, self.lr, self.weight_decay, grad_accum, self.alpha, self.seed)

    def identity(self) -> dict[str, Any]:
        """The options a resumed run must share with the run it continues (not where or on what it runs)."""
        same = {k: v for k, v in self.to_dict().items() if k not in ("out", "device", "max_cache_bytes")}
        for key in ("features", "clinical", "splits"):
            if same[key] is not None:
                same[key] = str(Path(same[key]).resolve())
        return same


def _records(cohort: Cohort, ids: list[str], bins: SurvivalBins, keys: dict[str, int]) -> list[PatientRecord]:
    rows = cohort.subset(ids)
    labels = bins.assign(rows["t"].to_numpy())
    return [
        PatientRecord(pid, list(row.slides), keys[pid], int(label), int(1 - row.e))
        for (pid, row), label in zip(rows.iterrows(), labels)
    ]


def _progress(console: Console, enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
        transient=False,
    )


def _load_bags(
    cache: BagCache, cohort: Cohort, patients: list[str], keys: dict[str, int], progress: Progress, where: str
) -> tuple[int, int]:
    """Read every needed slide once (filling the cache) and return the patch and region feature sizes."""
    task = progress.add_task("loading features", total=len(patients))
    dims: dict[tuple[int, int], str] = {}
    for pid in patients:
        bag = cache.bag(pid, cohort.patients.at[pid, "slides"], keys[pid])
        dims.setdefault((bag.patch.shape[1], bag.region.shape[1]), pid)
        progress.advance(task)
    if len(dims) > 1:
        detail = ", ".join(f"{d} (e.g. patient {p})" for d, p in dims.items())
        raise FeatureStoreError(f"{where}: feature sizes differ between patients: {detail}; use one encoder for the whole cohort")
    return next(iter(dims))


def _fold_bins(n_bins: int, cohort: Cohort, fold: Fold, global_bins: SurvivalBins | None) -> SurvivalBins:
    if global_bins is not None:
        return global_bins
    train = cohort.subset(fold.train)
    return fit_bins(train["t"].to_numpy(), train["e"].to_numpy(), n_bins, mode="train")


def _write_csv(path: Path, frame: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def c_index_summary(scores: list[float | None]) -> dict[str, Any]:
    """Mean ± std (ddof 0) over the folds whose C-index is defined, and how many those are."""
    counted = np.array([c for c in scores if c is not None], dtype=float)
    return {
        "folds": scores,
        "mean": float(counted.mean()) if len(counted) else None,
        "std": float(counted.std()) if len(counted) else None,
        "std_ddof": 0,
        "counted": int(len(counted)),
        "undefined_folds": [i for i, c in enumerate(scores) if c is None],
    }


def fold_seed(seed: int, fold_index: int) -> int:
    """The seed of one fold's weights and batch order: distinct per fold, fixed by the run's seed.

    Every fold starting from the run's seed would tie the folds' initialisations
    together, so the fold spread would understate the seed-to-seed noise.
    """
    return int(np.random.SeedSequence([seed, fold_index]).generate_state(1)[0])


def run_cv(
    config: CVConfig | None = None,
    *,
    show_progress: bool = True,
    console: Console | None = None,
    overwrite: bool = False,
    resume: bool = False,
    **kwargs: Any,
) -> dict:
    """Check the input, cross-validate one model and write the run folder; return the summary dict.

    Pass a :class:`CVConfig`, or its fields as keyword arguments
    (``run_cv(features=..., clinical=..., out=..., model="abmil")``). A non-empty ``out``
    is refused unless it holds an unfinished run of the same settings (resumed) or
    ``overwrite`` is given (the earlier run's outputs are removed first); ``resume`` on a
    finished run of the same settings returns its summary.
    """
    config = config or CVConfig(**kwargs)
    console = console or Console(stderr=True)
    started = time.perf_counter()
    out = config.out
    plan = plan_cv(config)
    store, folds = plan.store, plan.folds
    accelerator = make_accelerator(config.device, plan.grad_accum, find_unused=config.model_class.find_unused_parameters)
    main = accelerator.is_main_process
    for notice in plan.notices if main else []:
        console.print(f"[yellow]note:[/] {notice}", highlight=False)

    bank = encoded = text_space = None
    options = dict(config.model_options)
    if config.model_class.variants:
        options.setdefault("variant", config.variant)
    if config.model_class.needs_prompts:
        bank = load_prompt_bank(config.prompts)
        text_space, aligned_options = text_space_options(config.text_encoder, store)
        encoded = {scale: encode_bank(bank, scale, config.text_encoder) for scale in ("patch", "region")}
        options.update(aligned_options)
    identity = {"config": config.identity(), "clinical_sha256": file_sha256(config.clinical),
                "folds": [f.val for f in folds], "settings": {k: v["used"] for k, v in plan.settings.items()}}
    # Every process takes the same decision; only the main one removes or writes anything.
    folder = RunFolder.open(out, identity, len(folds), overwrite=overwrite, resume=resume, keep=config.splits, clean=main)
    # Every process has looked at the folder before the main one writes into it.
    accelerator.wait_for_everyone()
    if folder.already_finished:
        if main:
            console.print(f"all {len(folds)} folds of this run are already finished in {out}; nothing to do")
        return json.loads((out / "summary.json").read_text())
    if folder.finished and main:
        console.print(f"resuming: {len(folder.finished)} of {len(folds)} folds finished in {out}", highlight=False)
    split_info = plan.split_info
    if main:
        folder.start()
        if config.splits is None:
            split_info = write_folds(folds, split_info, out / "splits")
    try:
        summary = _run_folds(config, plan, folder, split_info, accelerator, bank, encoded, text_space, options,
                             show_progress, console, started)
    except KeyboardInterrupt:
        if main:
            folder.stopped("interrupted")
        raise
    except Exception as exc:
        if main:
            folder.stopped("failed", f"{type(exc).__name__}: {exc}")
        raise
    if main:
        folder.stopped("finished")
    return summary


def _run_folds(config: CVConfig, plan: CVPlan, folder: RunFolder, split_info: dict, accelerator: Any, bank: Any,
               encoded: Any, text_space: Any, options: dict, show_progress: bool, console: Console, started: float) -> dict:
    """Train and evaluate the folds not yet finished, then write the pooled outputs and the summary."""
    from accelerate.utils import gather_object, set_seed

    out = config.out
    store, cohort, folds = plan.store, plan.cohort, plan.folds
    keys = {pid: i for i, pid in enumerate(cohort.patient_ids)}
    main = accelerator.is_main_process
    train_config = config.train_config(plan.grad_accum)
    cache = BagCache(store, config.region_tokens, config.max_cache_bytes)
    want_evidence = config.evidence and config.model_class.gives_evidence
    prompt_meta = {} if bank is None else {"prompts": {s: prompt_table(bank.scale(s), bank.labels) for s in ("patch", "region")}}
    used = list(dict.fromkeys(p for f in folds for p in f.train + f.val))

    results: dict[int, dict[str, Any]] = dict(folder.finished)
    resumed = sorted(results)
    with _progress(console, show_progress and main) as progress:
        in_dim, region_dim = _load_bags(cache, cohort, used, keys, progress, str(config.features))
        for fold in folds:
            if fold.index in results:
                continue
            set_seed(fold_seed(config.seed, fold.index))
            bins = _fold_bins(plan.n_bins, cohort, fold, plan.global_bins)
            model = build_model(config.model, in_dim=in_dim, region_dim=region_dim, n_bins=bins.n_bins, options=options, prompts=encoded)
            scaler = None
            if config.standardize:
                scaler = FeatureScaler.fit(cache.bag(pid, cohort.patients.at[pid, "slides"]) for pid in fold.train)
            dataset = BagDataset(cache, _records(cohort, fold.train, bins, keys), None if scaler is None else scaler.apply)
            label = f"{config.model} fold {fold.index + 1}/{len(folds)}"
            task = progress.add_task(label, total=config.epochs)

            def on_epoch(epoch: int, stats: dict[str, float], task: Any = task, label: str = label) -> None:
                progress.update(task, advance=1, description=f"{label} loss {stats['loss']:.3f}")

            model, history = train_model(model, dataset, train_config, accelerator, on_epoch)
            val = cohort.subset(fold.val)
            predicted = []
            # A contiguous share per process, gathered in process order: the whole list again.
            with accelerator.split_between_processes(fold.val) as share:
                for pid in share:
                    bag = cache.bag(pid, cohort.patients.at[pid, "slides"], keys[pid])
                    pred = predict_bag(model, bag if scaler is None else scaler.apply(bag), accelerator.device, evidence=want_evidence)
                    predicted.append((pid, pred.risk, slide_evidence(bag, pred.evidence) if want_evidence else None))
            predicted = gather_object(predicted)
            if [pid for pid, _, _ in predicted] != fold.val:
                raise RuntimeError(f"fold {fold.index}: gathered predictions do not cover the validation patients in order")
            risks = [risk for _, risk, _ in predicted]
            for pid, risk, records in predicted if want_evidence and main else []:
                write_evidence(out / "evidence", pid, records,
                               {"model": config.model, "fold": fold.index, "risk": risk, **prompt_meta})
            ci = None if fold.index in plan.undefined_folds else c_index(val["t"].to_numpy(), val["e"].to_numpy(), np.asarray(risks))
            row = {
                "fold": fold.index,
                "c_index": ci,
                "n_train": len(fold.train),
                "n_val": len(fold.val),
                "val_events": int(val["e"].sum()),
                "bins": bins.as_dict(),
                "final_loss": history[-1]["loss"],
                "history": history,
            }
            oof = [
                {"patient_id": pid, "fold": fold.index, "risk": r, "t": float(t), "e": int(e)}
                for pid, r, t, e in zip(fold.val, risks, val["t"], val["e"])
            ]
            results[fold.index] = {"row": row, "oof": oof}
            if main:
                meta: dict[str, Any] = {
                    "model_name": config.model,
                    "fold": fold.index,
                    "bins": bins.as_dict(),
                    "region_tokens": cache.region_tokens,
                    "feature_encoder": store.encoder,
                    "scaler": None if scaler is None else scaler.to_dict(),
                    "train": train_config.to_dict(),
                    "slidevl_version": slidevl.__version__,
                }
                if bank is not None:
                    meta["prompts"] = {**bank.as_dict(), "text_encoder": config.text_encoder}
                save_checkpoint(out / f"fold_{fold.index}", model, meta)
                folder.fold_finished(fold.index, results[fold.index])
            progress.update(task, description=f"{label} C-index {'undefined' if ci is None else f'{ci:.3f}'}")

    fold_rows = [results[f.index]["row"] for f in folds]
    oof_frame = pd.DataFrame([r for f in folds for r in results[f.index]["oof"]], columns=["patient_id", "fold", "risk", "t", "e"])
    strat = stratify(oof_frame["t"].to_numpy(), oof_frame["e"].to_numpy(), oof_frame["risk"].to_numpy())
    summary = {
        "model": config.model,
        "variant": config.variant if config.model_class.variants else None,
        "c_index": c_index_summary([row["c_index"] for row in fold_rows]),
        "logrank_p": strat.p_value,
        "stratification": strat.as_dict(),
        "seed": config.seed,
        "fold_seeds": {f.index: fold_seed(config.seed, f.index) for f in folds},
        "bins": {"mode": config.bins_mode, "n_bins": plan.n_bins, "edges": [row["bins"]["edges"] for row in fold_rows]},
        "evaluation": "final epoch of every fold; no selection on validation data",
        "settings": plan.settings,
        "notices": plan.notices,
        "resumed_folds": resumed,
        "cohort": {
            "clinical": str(config.clinical),
            "patients": len(cohort),
            "slides": int(cohort.patients["slides"].map(len).sum()),
            "events": int(cohort.patients["e"].sum()),
            "skipped_slides": cohort.skipped_slides,
            "skipped_patients": cohort.skipped_patients,
        },
        "splits": split_info,
        "features": {"job": str(config.features), "encoder": store.encoder, "in_dim": in_dim, "region_dim": region_dim, **cache.stats()},
        "folds": fold_rows,
        "config": config.to_dict(),
        "train": train_config.to_dict(),
        "timing": {
            "mean_epoch_seconds": float(np.mean([h["seconds"] for row in fold_rows for h in row["history"]])),
            "mean_epoch_cpu_seconds": float(np.mean([h["cpu_seconds"] for row in fold_rows for h in row["history"]])),
            "total_seconds": time.perf_counter() - started,
        },
        "environment": {"slidevl": slidevl.__version__, "python": platform.python_version(), "device": str(accelerator.device),
                        "processes": accelerator.num_processes},
    }
    if bank is not None:
        summary["prompts"] = {"bank": bank.name, "source": bank.source, "text_encoder": config.text_encoder}
        summary["text_space"] = text_space
    if main:
        _write_csv(out / "oof_risks.csv", oof_frame)
        plot_km(out / "km.png", oof_frame["t"].to_numpy(), oof_frame["e"].to_numpy(), strat,
                title=f"{config.model}{' ' + config.variant if config.model_class.variants else ''}")
        write_json_atomic(out / "summary.json", summary)
    return summary
