"""One training loop for every stage: accelerate, gradient accumulation, exact resume.

The data order of epoch ``e`` is a permutation seeded by ``(seed, e)``, so a resumed run
skips the micro-batches it already consumed and sees the same batches as an
uninterrupted one; together with the restored optimizer, scheduler and RNG states the
resumed run reproduces the uninterrupted one. Checkpoints are written at optimizer-step
boundaries, every ``save_every`` steps and at the end.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from accelerate import Accelerator
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from slidevl.atomic import write_json_atomic
from slidevl.slidellm.tuning.config import TrainSettings
from slidevl.slidellm.tuning.state import (
    CheckpointError,
    atomic_dir,
    load_state,
    rng_state,
    save_state,
    set_rng_state,
)

TRAINER_DIR = "trainer"


class EpochSampler(Sampler[int]):
    """A fresh permutation per epoch, determined by ``(seed, epoch)`` alone."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=g).tolist())

    def __len__(self) -> int:
        return self.size


def cosine_schedule(total_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    """Linear warm-up then cosine decay to zero, as a LambdaLR factor."""
    warmup = max(1, math.ceil(total_steps * warmup_ratio)) if warmup_ratio > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


@dataclass
class LoopResult:
    """What a finished (or already finished) run reports."""

    steps: int
    epochs_completed: int
    seconds: float
    history: list[list[float]] = field(default_factory=list)

    @property
    def final_loss(self) -> float | None:
        """Mean loss of the last ten optimizer steps."""
        tail = [h[1] for h in self.history[-10:]]
        return sum(tail) / len(tail) if tail else None


def make_accelerator(settings: TrainSettings) -> Accelerator:
    return Accelerator(
        gradient_accumulation_steps=settings.grad_accum,
        mixed_precision="bf16" if settings.bf16 else "no",
        cpu=settings.cpu,
    )


def run_loop(
    *,
    accelerator: Accelerator,
    module: nn.Module,
    dataset: Dataset,
    collate: Callable[[Sequence[Any]], Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    settings: TrainSettings,
    lr: float,
    run_dir: Path,
    save_model: Callable[[Path], None],
    resume: bool,
    description: str,
    device_placement: bool = True,
) -> LoopResult:
    """Train the parameters of ``module`` that require grad; checkpoint into ``run_dir/checkpoint``.

    ``loss_fn(prepared_module, batch)`` returns the mean loss of a micro-batch;
    ``save_model(folder)`` writes the model parts of a checkpoint into ``folder``.
    ``device_placement=False`` leaves parameters where they are (quantised LLMs).
    """
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: no parameter requires grad")
    n = len(dataset)  # type: ignore[arg-type]
    batches_per_epoch = math.ceil(n / settings.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / settings.grad_accum)
    total = settings.epochs * steps_per_epoch
    if settings.max_steps is not None:
        total = min(total, settings.max_steps)

    sampler = EpochSampler(n, settings.seed)
    # The loader's own generator keeps iterator start-up from drawing on the global RNG,
    # whose state (dropout) a resumed run restores exactly.
    loader = DataLoader(
        dataset,
        batch_size=settings.batch_size,
        sampler=sampler,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(settings.seed),
    )
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_schedule(total, settings.warmup_ratio))
    # A 4-bit model is already placed by bitsandbytes and must not be moved again.
    module = accelerator.prepare_model(module, device_placement=device_placement)
    optimizer, loader = accelerator.prepare(optimizer, loader)

    counters = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "seconds": 0.0}
    history: list[list[float]] = []
    ckpt = run_dir / "checkpoint"
    if resume:
        trainer = ckpt / TRAINER_DIR
        if not trainer.is_dir():
            raise CheckpointError(f"{trainer}: no trainer state to resume from; start the run without --resume")
        saved = load_state(trainer, "trainer")
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        counters.update(saved["counters"])
        history = [list(h) for h in saved["history"]]
        set_rng_state(saved["rng"])

    def checkpoint() -> None:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            with atomic_dir(ckpt) as tmp:
                save_model(tmp)
                (tmp / TRAINER_DIR).mkdir()
                save_state(
                    tmp / TRAINER_DIR,
                    "trainer",
                    {
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "counters": dict(counters),
                        "history": history,
                        "rng": rng_state(),
                    },
                )
        accelerator.wait_for_everyone()

    started = time.perf_counter() - counters["seconds"]
    module.train()
    progress = Progress(
        TextColumn(f"[bold]{description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not accelerator.is_main_process,
    )
    # A bar only draws on a terminal; a run logged to a file gets a line every 5% instead.
    log_every = 0 if progress.console.is_terminal or not accelerator.is_main_process else max(1, total // 20)
    with progress:
        task = progress.add_task(description, total=total, completed=counters["step"], loss="-")
        window: list[float] = []
        while counters["step"] < total:
            skip = counters["batch_in_epoch"]
            batches = accelerator.skip_first_batches(loader, skip) if skip else loader
            # accelerate's loaders re-seed their sampler from their own iteration counter,
            # so the epoch is set on the loader actually iterated (a skipping copy starts at 0).
            batches.set_epoch(counters["epoch"])
            # Datasets whose records change per epoch (shuffled options) draw from (seed, epoch, index).
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(counters["epoch"])
            finished_epoch = True
            for batch in batches:
                with accelerator.accumulate(module):
                    loss = loss_fn(module, batch)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and settings.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(params, settings.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad()
                counters["batch_in_epoch"] += 1
                window.append(float(loss.detach()))
                if not accelerator.sync_gradients:
                    continue
                scheduler.step()
                counters["step"] += 1
                mean = sum(window) / len(window)
                window = []
                history.append([counters["step"], mean, scheduler.get_last_lr()[0]])
                progress.update(task, advance=1, loss=f"{mean:.4f}")
                counters["seconds"] = time.perf_counter() - started
                if log_every and counters["step"] % log_every == 0:
                    progress.console.print(f"{description}: step {counters['step']}/{total}, loss {mean:.4f}, "
                                           f"{counters['seconds'] / 60:.1f} min")
                if counters["step"] % settings.save_every == 0 or counters["step"] >= total:
                    checkpoint()
                if counters["step"] >= total:
                    finished_epoch = False
                    break
            # An epoch also ends when the last step fell on its last micro-batch.
            if finished_epoch or counters["batch_in_epoch"] >= len(loader):
                counters["epoch"] += 1
                counters["batch_in_epoch"] = 0
    result = LoopResult(counters["step"], counters["epoch"], counters["seconds"], history)
    if accelerator.is_main_process:
        write_json_atomic(
            run_dir / "summary.json",
            {
                "stage": description,
                "steps": result.steps,
                "epochs_completed": result.epochs_completed,
                "examples": n,
                "seconds": round(result.seconds, 2),
                "first_loss": history[0][1] if history else None,
                "final_loss": result.final_loss,
                "trainable_parameters": sum(p.numel() for p in params),
            },
        )
    return result
