"""Honest k-fold cross-validation of one survival model.

Per fold: fit the bins (on the whole cohort or the training fold only), train for a
fixed number of epochs, evaluate the final model on the validation patients — no
checkpoint selection on validation data — and save it. Across folds: mean ± std of
the validation C-index, out-of-fold risks, and a Kaplan–Meier plot of the high/low
risk groups (median split of the pooled out-of-fold risks) with the log-rank test.

Outputs in ``out``: ``summary.json``, ``oof_risks.csv``, ``km.png``,
``fold_k/{model.safetensors,config.json}`` and ``evidence/<slide>.json``.
"""

from __future__ import annotations

import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

import slidevl
from slidevl.atomic import atomic_path, write_json_atomic
from slidevl.features.store import FeatureStore, FeatureStoreError
from slidevl.survival.checkpoint import save_checkpoint
from slidevl.survival.cohort import Cohort, load_cohort
from slidevl.survival.data import REGION_TOKEN_MODES, BagCache
from slidevl.survival.evidence import prompt_table, write_evidence
from slidevl.survival.folds import Fold, load_folds, make_folds
from slidevl.survival.hila.model import VARIANTS
from slidevl.survival.hila.prompts import (
    DEFAULT_TEXT_ENCODER,
    encode_bank,
    is_aligned,
    load_prompt_bank,
    normalise_encoder_spec,
    text_space_options,
)
from slidevl.survival.labels import SurvivalBins, fit_bins
from slidevl.survival.metrics import c_index, plot_km, stratify
from slidevl.survival.registry import MODELS, build_model
from slidevl.survival.scaling import FeatureScaler
from slidevl.survival.train import BagDataset, ConfigError, PatientRecord, TrainConfig, make_accelerator, predict_bag, train_model

BINS_MODES = ("all", "train")
EVIDENCE_MODELS = ("hila", "abmil")


@dataclass
class CVConfig:
    """Everything that defines a cross-validation run (recorded in ``summary.json``)."""

    features: Path
    clinical: Path
    out: Path
    model: str = "hila"
    splits: Path | None = None
    k: int = 5
    epochs: int = 20
    seed: int = 0
    lr: float = 2e-4
    weight_decay: float = 1e-5
    grad_accum: int = 32
    alpha: float = 0.0
    n_bins: int = 4
    bins_mode: str = "all"
    variant: str = "full"
    prompts: str = "synthetic"
    text_encoder: str = DEFAULT_TEXT_ENCODER
    region_tokens: str = "auto"
    encoder: str | None = None
    skip_missing: bool = False
    device: str = "auto"
    model_options: dict[str, Any] = field(default_factory=dict)
    standardize: bool = True
    evidence: bool = True
    max_cache_bytes: int | None = None

    def __post_init__(self) -> None:
        self.features, self.clinical, self.out = Path(self.features), Path(self.clinical), Path(self.out)
        self.splits = None if self.splits is None else Path(self.splits)
        if self.model not in MODELS:
            raise ConfigError(f"--model must be one of {sorted(MODELS)}, got {self.model!r}")
        if self.bins_mode not in BINS_MODES:
            raise ConfigError(f"--bins-mode must be one of {BINS_MODES}, got {self.bins_mode!r}")
        if self.region_tokens not in REGION_TOKEN_MODES:
            raise ConfigError(f"--region-tokens must be one of {REGION_TOKEN_MODES}, got {self.region_tokens!r}")
        if self.epochs < 1 or self.grad_accum < 1 or self.k < 2:
            raise ConfigError(f"need --epochs >= 1, --grad-accum >= 1 and --k >= 2 (got {self.epochs}, {self.grad_accum}, {self.k})")
        if self.model == "hila" and self.variant not in VARIANTS:
            raise ConfigError(f"--variant must be one of {list(VARIANTS)}, got {self.variant!r}")
        if self.model != "hila" and self.variant != "full":
            raise ConfigError(f"--variant applies to HiLa only; got --model {self.model} --variant {self.variant}")
        if self.model == "hila":
            self.text_encoder = normalise_encoder_spec(self.text_encoder)
            # Prompts from the features' own model are compared with the raw features;
            # standardising would move the features out of that space.
            if is_aligned(self.text_encoder):
                self.standardize = False

    def train_config(self) -> TrainConfig:
        return TrainConfig(self.epochs, self.lr, self.weight_decay, self.grad_accum, self.alpha, self.seed)

    def as_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


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


def _fold_bins(config: CVConfig, cohort: Cohort, fold: Fold, global_bins: SurvivalBins | None) -> SurvivalBins:
    if global_bins is not None:
        return global_bins
    train = cohort.subset(fold.train)
    return fit_bins(train["t"].to_numpy(), train["e"].to_numpy(), config.n_bins, mode="train")


def _write_csv(path: Path, frame: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def run_cv(config: CVConfig | None = None, *, show_progress: bool = True, console: Console | None = None, **kwargs: Any) -> dict:
    """Cross-validate one model and write the run folder; return the summary dict.

    Pass a :class:`CVConfig`, or its fields as keyword arguments
    (``run_cv(features=..., clinical=..., out=..., model="abmil")``).
    """
    from accelerate.utils import set_seed

    config = config or CVConfig(**kwargs)
    console = console or Console(stderr=True)
    started = time.perf_counter()
    out = config.out
    store = FeatureStore(config.features, config.encoder)
    cohort = load_cohort(config.clinical, store.__contains__, skip_missing=config.skip_missing)
    if cohort.skipped_slides:
        console.print(
            f"[yellow]--skip-missing:[/] {len(cohort.skipped_slides)} slide(s) without features left out "
            f"({len(cohort.skipped_patients)} patient(s) lost entirely)"
        )
    if config.splits is not None:
        folds, split_info = load_folds(cohort, config.splits)
    else:
        folds, split_info = make_folds(cohort, config.k, config.seed, out / "splits")
    keys = {pid: i for i, pid in enumerate(cohort.patient_ids)}
    global_bins = None
    if config.bins_mode == "all":
        global_bins = fit_bins(cohort.patients["t"].to_numpy(), cohort.patients["e"].to_numpy(), config.n_bins, mode="all")

    bank = encoded = text_space = None
    options = dict(config.model_options)
    if config.model == "hila":
        bank = load_prompt_bank(config.prompts)
        text_space, aligned_options = text_space_options(config.text_encoder, store)
        encoded = {scale: encode_bank(bank, scale, config.text_encoder) for scale in ("patch", "region")}
        options.setdefault("variant", config.variant)
        options.update(aligned_options)
    accelerator = make_accelerator(config.device, config.grad_accum)
    main = accelerator.is_main_process
    train_config = config.train_config()
    cache = BagCache(store, config.region_tokens, config.max_cache_bytes)
    want_evidence = config.evidence and config.model in EVIDENCE_MODELS
    prompt_meta = {} if bank is None else {"prompts": {s: prompt_table(bank.scale(s), bank.labels) for s in ("patch", "region")}}
    used = list(dict.fromkeys(p for f in folds for p in f.train + f.val))

    fold_rows, oof = [], []
    with _progress(console, show_progress and main) as progress:
        in_dim, region_dim = _load_bags(cache, cohort, used, keys, progress, str(config.features))
        for fold in folds:
            set_seed(config.seed)
            bins = _fold_bins(config, cohort, fold, global_bins)
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
            risks = []
            for pid in fold.val:
                bag = cache.bag(pid, cohort.patients.at[pid, "slides"], keys[pid])
                pred = predict_bag(model, bag if scaler is None else scaler.apply(bag), accelerator.device, evidence=want_evidence)
                risks.append(pred.risk)
                if want_evidence and main:
                    write_evidence(out / "evidence", bag, pred.evidence,
                                   {"model": config.model, "fold": fold.index, "risk": pred.risk, **prompt_meta})
            ci = c_index(val["t"].to_numpy(), val["e"].to_numpy(), np.asarray(risks))
            fold_rows.append({
                "fold": fold.index,
                "c_index": ci,
                "n_train": len(fold.train),
                "n_val": len(fold.val),
                "val_events": int(val["e"].sum()),
                "bins": bins.as_dict(),
                "final_loss": history[-1]["loss"],
                "history": history,
            })
            oof += [
                {"patient_id": pid, "fold": fold.index, "risk": r, "t": float(t), "e": int(e)}
                for pid, r, t, e in zip(fold.val, risks, val["t"], val["e"])
            ]
            if main:
                meta: dict[str, Any] = {
                    "model_name": config.model,
                    "fold": fold.index,
                    "bins": bins.as_dict(),
                    "region_tokens": cache.region_tokens,
                    "feature_encoder": store.encoder,
                    "scaler": None if scaler is None else scaler.to_dict(),
                    "train": train_config.as_dict(),
                    "slidevl_version": slidevl.__version__,
                }
                if bank is not None:
                    meta["prompts"] = {**bank.as_dict(), "text_encoder": config.text_encoder}
                save_checkpoint(out / f"fold_{fold.index}", model, meta)
            progress.update(task, description=f"{label} C-index {ci:.3f}")

    oof_frame = pd.DataFrame(oof, columns=["patient_id", "fold", "risk", "t", "e"])
    strat = stratify(oof_frame["t"].to_numpy(), oof_frame["e"].to_numpy(), oof_frame["risk"].to_numpy())
    scores = np.array([row["c_index"] for row in fold_rows])
    summary = {
        "model": config.model,
        "variant": config.variant if config.model == "hila" else None,
        "c_index": {"folds": scores.tolist(), "mean": float(scores.mean()), "std": float(scores.std()), "std_ddof": 0},
        "logrank_p": strat.p_value,
        "stratification": strat.as_dict(),
        "seed": config.seed,
        "bins": {"mode": config.bins_mode, "n_bins": config.n_bins, "edges": [row["bins"]["edges"] for row in fold_rows]},
        "evaluation": "final epoch of every fold; no selection on validation data",
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
        "config": config.as_dict(),
        "train": train_config.as_dict(),
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
                title=f"{config.model}{'' if config.model != 'hila' else ' ' + config.variant}")
        write_json_atomic(out / "summary.json", summary)
    return summary
