"""Training and inference of one model on patient bags, through ``accelerate``.

One patient per step with gradient accumulation (``TrainConfig`` keeps HiLa's 32; cross-validation
fits it to the cohort, see :mod:`slidevl.survival.validate`), Adam,
a fixed number of epochs, no early stopping and no selection on validation data: the
model of the last epoch is the model. The same code runs on CPU, one GPU or several
(``accelerate launch``). With several processes each takes every N-th patient of the
epoch's shuffled order and DDP averages the gradients, so N processes at ``grad_accum``
k/N take the same optimiser steps as one process at k (HiLa's memory queue receives
every process's keys, see :mod:`slidevl.survival.hila.mcl`); the per-epoch losses are
summed over all processes before they are averaged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from slidevl.config import Config
from slidevl.errors import ConfigError
from slidevl.survival.data import BagCache, PatientBag
from slidevl.survival.loss import hazards_and_survival, nll_loss, risk_from_survival
from slidevl.survival.models.base import SurvivalModel

DEVICES = ("auto", "cpu", "cuda")


@dataclass
class TrainConfig(Config):
    """One fold's training schedule (cross-validation fills it from :class:`~slidevl.survival.cv.CVConfig`)."""

    epochs: int = 20
    lr: float = 2e-4
    weight_decay: float = 1e-5
    grad_accum: int = 32
    alpha: float = 0.0  # NLL weight of the uncensored term, as MCAT's alpha_surv
    seed: int = 0


@dataclass
class PatientRecord:
    """What a dataset item needs besides the features."""

    patient_id: str
    slides: list[str]
    key: int
    label: int = 0
    censored: int = 0


class BagDataset(Dataset):
    """Patient bags with their bin label and censorship, read through the slide cache.

    ``transform`` (e.g. the fold's feature scaling) is applied to every bag on access.
    """

    def __init__(
        self, cache: BagCache, records: Sequence[PatientRecord], transform: Callable[[PatientBag], PatientBag] | None = None
    ) -> None:
        self.cache = cache
        self.records = list(records)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        r = self.records[i]
        bag = self.cache.bag(r.patient_id, r.slides, r.key)
        return {
            "bag": bag if self.transform is None else self.transform(bag),
            "y": torch.tensor([r.label], dtype=torch.long),
            "c": torch.tensor([r.censored], dtype=torch.float32),
        }


def _single(batch: list[dict[str, Any]]) -> dict[str, Any]:
    # One patient per step: bags differ in size, so they are never stacked.
    return batch[0]


def make_accelerator(device: str = "auto", grad_accum: int = 32, *, find_unused: bool = True):
    """An ``Accelerator`` for ``device`` (``auto`` lets accelerate pick) with gradient accumulation.

    ``find_unused`` lets DDP accept parameters without a gradient on a step (HiLa); a model
    that always uses all of them runs without the extra graph walk.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    if device not in DEVICES:
        raise ConfigError(f"--device must be one of {DEVICES}, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was requested but no CUDA device is visible; use --device cpu or auto")
    # HiLa's top-r selection and ablations leave some parameters without gradient on a step.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=find_unused)
    return Accelerator(cpu=device == "cpu", gradient_accumulation_steps=grad_accum, kwargs_handlers=[ddp])


def train_model(
    model: SurvivalModel,
    dataset: BagDataset,
    config: TrainConfig,
    accelerator: Any,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> tuple[SurvivalModel, list[dict[str, float]]]:
    """Train for ``config.epochs`` epochs; return the unwrapped final model and per-epoch stats."""
    optimizer = torch.optim.Adam(
        (p for p in model.parameters() if p.requires_grad), lr=config.lr, weight_decay=config.weight_decay
    )
    # The order follows the seed set for this model (the fold's) alone: the same with one
    # process or several. Without a generator accelerate seeds the shuffle from another draw
    # with several processes than with one, and the two runs would see other batches.
    order = torch.Generator().manual_seed(torch.initial_seed())
    loader = DataLoader(dataset, batch_size=1, shuffle=True, collate_fn=_single, num_workers=0, generator=order)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    history = []
    for epoch in range(config.epochs):
        model.train()
        started, cpu_started = time.perf_counter(), time.process_time()
        total = surv_total = aux_total = 0.0
        for batch in loader:
            with accelerator.accumulate(model):
                out = model(batch["bag"])
                hazards, survival = hazards_and_survival(out.logits.unsqueeze(0))
                surv_loss = nll_loss(hazards, survival, batch["y"], batch["c"], alpha=config.alpha)
                loss = surv_loss if out.aux_loss is None else surv_loss + out.aux_loss
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            total += float(loss.detach())
            surv_total += float(surv_loss.detach())
            aux_total += 0.0 if out.aux_loss is None else float(out.aux_loss.detach())
        # Every process saw its own share of the patients: the epoch's loss is over all of them
        # (with the few patients accelerate repeats to give every process as many steps).
        sums = accelerator.reduce(
            torch.tensor([total, surv_total, aux_total, len(loader)], dtype=torch.float64, device=accelerator.device), "sum"
        ).tolist()
        n = max(1.0, sums[3])
        stats = {
            "epoch": epoch + 1,
            "loss": sums[0] / n,
            "nll": sums[1] / n,
            "aux": sums[2] / n,
            "seconds": time.perf_counter() - started,
            # Process CPU time: comparable between models on a machine shared with other jobs.
            "cpu_seconds": time.process_time() - cpu_started,
        }
        history.append(stats)
        if on_epoch is not None:
            on_epoch(epoch + 1, stats)
    unwrapped = accelerator.unwrap_model(model)
    accelerator.free_memory()
    return unwrapped, history


@dataclass
class Prediction:
    patient_id: str
    hazards: np.ndarray
    survival: np.ndarray
    risk: float
    evidence: dict[str, Any]


@torch.no_grad()
def predict_bag(model: SurvivalModel, bag: PatientBag, device: torch.device | str, *, evidence: bool = False) -> Prediction:
    """Hazards, survival curve and risk (−ΣS) of one patient with the model in eval mode."""
    model.eval()
    out = model(bag.to(device), evidence=evidence)
    hazards, survival = hazards_and_survival(out.logits.float())
    return Prediction(
        bag.patient_id,
        hazards.cpu().numpy(),
        survival.cpu().numpy(),
        float(risk_from_survival(survival)),
        out.evidence,
    )
