"""One training loop for every stage: accelerate, gradient accumulation, exact resume.

The data order of epoch ``e`` is a permutation seeded by ``(seed, e)``, so a resumed run
skips the micro-batches it already consumed and sees the same batches as an
uninterrupted one; together with the restored optimizer, scheduler and RNG states the
resumed run reproduces the uninterrupted one. Checkpoints are written at optimizer-step
boundaries, every ``save_every`` steps and at the end.

Under ``accelerate launch`` with N processes (DDP, or FSDP for a large LLM) every process
takes every N-th micro-batch of the same order, so N processes at ``grad_accum`` k/N take
the optimizer steps of one process at k. The logged loss of a step is the mean over all
processes; the main process alone writes checkpoints and the summary, with the RNG state
of every process, so a resumed run (with as many processes) continues each one exactly.
Under FSDP the checkpoint gathers the sharded weights and optimizer state first.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from slidevl.atomic import write_json_atomic
from slidevl.errors import CheckpointError
from slidevl.slidellm.tuning.config import TrainSettings
from slidevl.slidellm.tuning.state import (
    atomic_dir,
    load_state,
    load_state_entry,
    rng_state,
    save_state,
    set_rng_state,
)

TRAINER_DIR = "trainer"
SUMMARY_NAME = "summary.json"


def unfinished_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a checkpoint of a run that stopped before its last step (no summary yet)."""
    return (run_dir / "checkpoint" / TRAINER_DIR).is_dir() and not (run_dir / SUMMARY_NAME).is_file()


def describe_checkpoint(run_dir: Path) -> str:
    """Where an interrupted run will continue from, for the interrupt line."""
    trainer = run_dir / "checkpoint" / TRAINER_DIR
    if not trainer.is_dir():
        return f"no checkpoint yet in {run_dir} (one is written every --save-every steps), so the run starts again"
    counters = load_state_entry(trainer, "trainer", "counters")
    return f"step {counters['step']} (epoch {counters['epoch'] + 1}) is checkpointed in {trainer.parent}"


#: Length grouping sorts the records within spans of this many batches of a shuffled epoch.
GROUP_SPAN_BATCHES = 50


class EpochSampler(Sampler[int]):
    """A fresh permutation per epoch, determined by ``(seed, epoch)`` alone.

    With ``lengths`` (one per record) the permutation is grouped by length, as Hugging
    Face's ``group_by_length`` does: the shuffled records are cut into spans of
    :data:`GROUP_SPAN_BATCHES` batches of ``batch_size``, each span is sorted by length and
    cut into batches, and the full batches are shuffled (a short last batch stays last, so
    the loader, which cuts the order into batches itself, keeps them whole). A batch then
    holds records of similar length and the padding that costs compute all but vanishes,
    while every span still mixes records from the whole epoch.
    """

    def __init__(self, size: int, seed: int, *, lengths: Sequence[int] | None = None, batch_size: int = 1) -> None:
        if lengths is not None and len(lengths) != size:
            raise ValueError(f"got {len(lengths)} lengths for {size} records")
        self.size = size
        self.seed = seed
        self.lengths = lengths
        self.batch_size = batch_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=g).tolist()
        if self.lengths is None:
            return iter(order)
        lengths, size = self.lengths, self.batch_size
        span = size * GROUP_SPAN_BATCHES
        batches = []
        for start in range(0, len(order), span):
            ranked = sorted(order[start : start + span], key=lambda i: -lengths[i])
            batches += [ranked[j : j + size] for j in range(0, len(ranked), size)]
        short = [batches.pop()] if len(batches[-1]) < size else []
        shuffled = [batches[k] for k in torch.randperm(len(batches), generator=g).tolist()] + short
        return iter([i for batch in shuffled for i in batch])

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


def _optimizer_state(accelerator: Accelerator, module: nn.Module, optimizer: Any) -> dict[str, Any]:
    """The optimizer state to save: whole under FSDP (gathered, collective), else the local one, equal on every process."""
    if accelerator.distributed_type != DistributedType.FSDP:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(module, optimizer.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _load_optimizer_state(accelerator: Accelerator, module: nn.Module, optimizer: Any, state: dict[str, Any]) -> None:
    if accelerator.distributed_type != DistributedType.FSDP:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(module, optimizer.optimizer, state, options=StateDictOptions(full_state_dict=True))


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
    save_model: Callable[[Path, dict[str, torch.Tensor]], None],
    resume: bool,
    description: str,
    device_placement: bool = True,
    lengths: Sequence[int] | None = None,
) -> LoopResult:
    """Train the parameters of ``module`` that require grad; checkpoint into ``run_dir/checkpoint``.

    ``loss_fn(prepared_module, batch)`` returns the mean loss of a micro-batch;
    ``save_model(folder, state)`` writes the model parts of a checkpoint into ``folder``
    from ``state``, the prepared module's state dict with the unwrapped module's keys
    (under FSDP gathered whole on the main process, the only place it is whole).
    ``device_placement=False`` leaves parameters where they are (quantised LLMs). ``lengths``
    (each record's sequence length) groups the batches by length when ``settings.group_by_length``.
    """
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    if not trainable:
        raise ValueError("nothing to train: no parameter requires grad")
    n = len(dataset)  # type: ignore[arg-type]
    grouped = lengths if settings.group_by_length else None
    sampler = EpochSampler(n, settings.seed, lengths=grouped, batch_size=settings.batch_size)
    # The loader's own generator keeps iterator start-up from drawing on the global RNG,
    # whose state (dropout) a resumed run restores exactly.
    loader = DataLoader(
        dataset,
        batch_size=settings.batch_size,
        sampler=sampler,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(settings.seed),
    )
    # A 4-bit model is already placed by bitsandbytes and must not be moved again.
    module = accelerator.prepare_model(module, device_placement=device_placement)
    # The optimizer takes the parameters of the prepared model: under FSDP those are its shards.
    params = [p for p in module.parameters() if p.requires_grad]
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    # FSDP's own clipping computes the norm over every shard; it wants all of the model's parameters.
    clipped = list(module.parameters()) if fsdp else params
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=settings.weight_decay)
    loader = accelerator.prepare_data_loader(loader)
    # Each process iterates its own share of the micro-batches.
    steps_per_epoch = math.ceil(len(loader) / settings.grad_accum)
    total = settings.epochs * steps_per_epoch
    if settings.max_steps is not None:
        total = min(total, settings.max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_schedule(total, settings.warmup_ratio))
    optimizer = accelerator.prepare_optimizer(optimizer)
    processes = accelerator.num_processes

    counters = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "seconds": 0.0}
    history: list[list[float]] = []
    ckpt = run_dir / "checkpoint"
    if resume:
        trainer = ckpt / TRAINER_DIR
        if not trainer.is_dir():
            raise CheckpointError(f"{trainer}: no trainer state to resume from; start the run without --resume")
        saved = load_state(trainer, "trainer")
        # Micro-batches are counted per process, so the position in the epoch holds only for
        # the number of processes the run had; an FSDP optimizer state is keyed by names.
        layout = (saved.get("processes", 1), saved.get("fsdp", False))
        if layout != (processes, fsdp):
            raise CheckpointError(
                f"{trainer}: the run was checkpointed with {layout[0]} process(es){' under FSDP' if layout[1] else ''}; "
                f"resume it the same way (accelerate launch --num_processes {layout[0]}"
                f"{' with the FSDP config' if layout[1] else ''}), not with {processes}{' under FSDP' if fsdp else ''}"
            )
        _load_optimizer_state(accelerator, module, optimizer, saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        counters.update(saved["counters"])
        history = [list(h) for h in saved["history"]]
        rngs = saved["rng"] if isinstance(saved["rng"], list) else [saved["rng"]]
        set_rng_state(rngs[accelerator.process_index])

    def checkpoint() -> None:
        accelerator.wait_for_everyone()
        # Collectives first, on every process: the RNG states, then (under FSDP) the gathered
        # weights and optimizer state; elsewhere these are the module's and optimizer's own.
        rngs = gather_object([rng_state()])
        weights = accelerator.get_state_dict(module)
        optimizer_state = _optimizer_state(accelerator, module, optimizer)
        if accelerator.is_main_process:
            with atomic_dir(ckpt) as tmp:
                save_model(tmp, weights)
                (tmp / TRAINER_DIR).mkdir()
                save_state(
                    tmp / TRAINER_DIR,
                    "trainer",
                    {
                        "optimizer": optimizer_state,
                        "scheduler": scheduler.state_dict(),
                        "counters": dict(counters),
                        "history": history,
                        "rng": rngs,
                        "processes": processes,
                        "fsdp": fsdp,
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
                        accelerator.clip_grad_norm_(clipped, settings.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad()
                counters["batch_in_epoch"] += 1
                window.append(float(loss.detach()))
                if not accelerator.sync_gradients:
                    continue
                scheduler.step()
                counters["step"] += 1
                # The step's loss over every process's micro-batches, not the main one's alone.
                mean = float(accelerator.reduce(torch.tensor(sum(window) / len(window), device=accelerator.device), "mean"))
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
            run_dir / SUMMARY_NAME,
            {
                "stage": description,
                "steps": result.steps,
                "epochs_completed": result.epochs_completed,
                "examples": n,
                "seconds": round(result.seconds, 2),
                "first_loss": history[0][1] if history else None,
                "final_loss": result.final_loss,
                "trainable_parameters": trainable,
                "processes": processes,
            },
        )
    return result
