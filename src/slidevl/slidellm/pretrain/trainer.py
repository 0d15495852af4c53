"""The pretraining loop: MAE (two phases) then MoCo, through ``accelerate``.

One optimiser step is ``grad_accum`` micro-batches of ``batch_slides`` slides each.
Runs on CPU or GPU, single or multi-process (``accelerate launch``). With N processes
each draws its own slides and views (its own data stream), DDP averages the gradients,
and every process's MoCo keys enter the queue (gathered in process order), so the
queues stay identical across processes; the logged losses are means over all
processes. A run resumes exactly from its last checkpoint: weights, optimiser,
momentum networks, queue, RNG streams (one per process) and data order are all restored.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from slidevl.errors import CheckpointError
from slidevl.slidellm.encoder.batch import TopoPackBatch, collate_batches
from slidevl.slidellm.encoder.config import TopoPackConfig
from slidevl.slidellm.encoder.model import TopoPackEncoder
from slidevl.slidellm.pretrain.augment import (
    AugmentConfig,
    add_feature_noise,
    augment_view,
    dihedral_transform,
    random_crop,
    random_symmetry,
)
from slidevl.slidellm.pretrain.checkpoint import has_checkpoint, load_checkpoint, save_checkpoint, write_loss_log
from slidevl.slidellm.pretrain.config import RESUMABLE_FIELDS, PretrainConfig
from slidevl.slidellm.pretrain.data import CachedSource, SlideSource, encoder_config_for
from slidevl.slidellm.pretrain.mae import mae_loss, mae_mask
from slidevl.slidellm.pretrain.modules import MomentumNetworks, PretrainModel
from slidevl.slidellm.pretrain.moco import EMPTY_SLIDE, moco_loss, pick_positives, slide_key


@dataclass
class PretrainResult:
    """Where the run ended and what it logged."""

    out_dir: Path
    step: int
    log: list[dict[str, Any]]
    encoder: TopoPackEncoder


def lr_at(step: int, config: PretrainConfig) -> float:
    """Linear warm-up then cosine decay to ``min_lr`` over the whole run."""
    total = max(1, config.total_steps)
    if step < config.warmup_steps:
        return config.lr * (step + 1) / max(1, config.warmup_steps)
    progress = (step - config.warmup_steps) / max(1, total - config.warmup_steps)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    # No decay on biases, norms and embeddings (1-D parameters), as usual for transformers.
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _resolve_configs(
    source: SlideSource,
    out_dir: Path,
    config: PretrainConfig | None,
    encoder_config: TopoPackConfig | None,
    resume: bool,
):
    """Configs of a new run, or the saved ones of a resumed run (schedule fields may change)."""
    if has_checkpoint(out_dir):
        if not resume:
            raise CheckpointError(f"{out_dir} already holds a pretraining checkpoint; pass resume=True (--resume) or pick a new folder")
        ckpt = load_checkpoint(out_dir)
        saved = ckpt.config
        if config is not None:
            changed = sorted(
                k for k, v in config.to_dict().items() if k not in RESUMABLE_FIELDS and saved.to_dict()[k] != v
            )
            if changed:
                raise CheckpointError(f"cannot change {changed} when resuming; only {list(RESUMABLE_FIELDS)} may change")
            saved = replace(saved, **{k: getattr(config, k) for k in RESUMABLE_FIELDS})
        if encoder_config is not None and encoder_config != ckpt.encoder_config:
            raise CheckpointError("the encoder config differs from the checkpoint's; resume with the saved one")
        return saved, ckpt.encoder_config, ckpt
    config = config or PretrainConfig()
    if encoder_config is None:
        encoder_config = encoder_config_for(source)
    return config, encoder_config, None


class _Sampler:
    """Epoch-wise random order over slide ids, reproducible from (order, cursor, generator)."""

    def __init__(self, n: int, generator: torch.Generator) -> None:
        self.n = n
        self.generator = generator
        self.order = torch.randperm(n, generator=generator)
        self.cursor = 0

    def take(self, k: int) -> list[int]:
        out = []
        for _ in range(k):
            if self.cursor >= self.n:
                self.order = torch.randperm(self.n, generator=self.generator)
                self.cursor = 0
            out.append(int(self.order[self.cursor]))
            self.cursor += 1
        return out


def mae_forward(
    model: Callable[..., Tensor],
    bases: list[TopoPackBatch],
    phase: int,
    config: PretrainConfig,
    generator: torch.Generator,
    device: torch.device,
) -> tuple[Tensor, dict[str, float]]:
    """MAE loss of one micro-batch of slides (augment → mask → encode → decode)."""
    aug = AugmentConfig(config.crop_min, config.crop_max, config.max_packs, config.dihedral, config.mae_noise)
    batch = collate_batches([augment_view(b, generator, aug) for b in bases]).to(device)
    mask = mae_mask(batch, phase, generator, config.mask_ratio)
    pred = model("mae", batch, mask)
    loss = mae_loss(pred, batch, mask, normalise=config.normalise_targets)
    return loss, {"mae_loss": loss.item(), "packs": float(batch.pack_valid.sum()), "masked_patches": float(mask.target.sum())}


def moco_forward(
    model: Callable[..., Tensor],
    momentum: MomentumNetworks,
    bases: list[TopoPackBatch],
    config: PretrainConfig,
    generator: torch.Generator,
    device: torch.device,
    gather: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """MoCo loss of one micro-batch, then enqueue this batch's keys.

    Both views share one crop (so positives exist) and differ in symmetry and noise.
    ``gather`` concatenates tensors across processes before they enter the queue.
    """
    views_a, views_b = [], []
    for base in bases:
        crop = random_crop(base, generator, min_frac=config.crop_min, max_frac=config.crop_max, max_packs=config.max_packs)
        for views in (views_a, views_b):
            view = dihedral_transform(crop, random_symmetry(generator)) if config.dihedral else crop
            views.append(add_feature_noise(view, generator, config.moco_noise))
    batch_a = collate_batches(views_a).to(device)
    batch_b = collate_batches(views_b).to(device)
    q_all = model("moco", batch_a)
    k_all = momentum.keys(batch_b).to(q_all.dtype)

    qs, ks, q_slides, enq, enq_slides = [], [], [], [], []
    for i, sid in enumerate(batch_a.slide_ids):
        key_id = slide_key(sid)
        cand = torch.nonzero(batch_a.pack_valid[i].cpu()).flatten()
        cand = cand[torch.randperm(cand.numel(), generator=generator)[: config.moco_queries]]
        pos = pick_positives(batch_a.pack_origin[i, cand], batch_b.pack_origin[i], batch_b.pack_valid[i], generator, config.moco_same_pack_prob)
        ok = pos >= 0
        qs.append(q_all[i, cand[ok].to(device)])
        ks.append(k_all[i, pos[ok].to(device)])
        q_slides.append(torch.full((int(ok.sum()),), key_id, dtype=torch.long))
        # A fixed number of queue entries per slide (padded with EMPTY) keeps process
        # gathers equal-sized and stops one large slide from filling the queue.
        kv = torch.nonzero(batch_b.pack_valid[i].cpu()).flatten()
        pick = kv[torch.randperm(kv.numel(), generator=generator)[: config.moco_enqueue]]
        keys = k_all.new_zeros(config.moco_enqueue, k_all.shape[-1])
        keys[: pick.numel()] = k_all[i, pick.to(device)]
        slides = torch.full((config.moco_enqueue,), EMPTY_SLIDE, dtype=torch.long)
        slides[: pick.numel()] = key_id
        enq.append(keys)
        enq_slides.append(slides)
    q = torch.cat(qs)
    k_pos = torch.cat(ks)
    q_slide = torch.cat(q_slides).to(device)
    queue = momentum.queue
    negatives = torch.cat([queue.features.to(k_pos.dtype), k_pos.detach()])
    negative_slides = torch.cat([queue.slides, q_slide])
    loss, stats = moco_loss(q, k_pos.detach(), q_slide, negatives, negative_slides, config.moco_temperature)
    keys, slides = torch.cat(enq).detach(), torch.cat(enq_slides).to(device)
    if gather is not None:
        keys, slides = gather(keys), gather(slides)
    queue.enqueue(keys.float(), slides)
    stats.update({"moco_loss": loss.item(), "packs": float(batch_a.pack_valid.sum())})
    return loss, stats


def _rng_state(generator: torch.Generator, sampler: _Sampler) -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "data": generator.get_state(),
        "order": sampler.order.clone(),
        "cursor": sampler.cursor,
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: dict[str, Any], generator: torch.Generator, sampler: _Sampler) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["data"])
    sampler.order = state["order"].clone()
    sampler.cursor = int(state["cursor"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def pretrain(
    source: SlideSource,
    out_dir: str | Path,
    *,
    config: PretrainConfig | None = None,
    encoder_config: TopoPackConfig | None = None,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    cpu: bool | None = None,
) -> PretrainResult:
    """Pretrain a topo-pack encoder on ``source`` and checkpoint it into ``out_dir``.

    Args:
        source: slides to train on (see :mod:`slidevl.slidellm.pretrain.data`).
        out_dir: checkpoint folder (created); refuses to overwrite one unless ``resume``.
        config: run settings; defaults to :class:`PretrainConfig()`.
        encoder_config: encoder settings; by default inferred from the first slide's
            feature widths with the paper's architecture.
        resume: continue from the checkpoint in ``out_dir`` if there is one.
        progress: show a progress bar.
        stop_after: stop (with a checkpoint) after this many steps in total, e.g. to
            split a run across jobs; the schedule still spans the full run.
        cpu: force CPU even when a GPU is present (default: use the GPU if any).
    """
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.utils import gather_object
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    out_dir = Path(out_dir)
    config, encoder_config, ckpt = _resolve_configs(source, out_dir, config, encoder_config, resume)
    accelerator = Accelerator(
        gradient_accumulation_steps=config.grad_accum,
        mixed_precision=config.mixed_precision,
        cpu=bool(cpu) if cpu is not None else not torch.cuda.is_available(),
        # The decoder is idle during MoCo and the head during MAE.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    device = accelerator.device
    source = CachedSource(source, config.cache_slides)
    slide_ids = source.slide_ids()
    if not slide_ids:
        raise ValueError("the slide source is empty")

    torch.manual_seed(config.seed)  # identical initial weights on every process
    model = PretrainModel(encoder_config, config)
    momentum = MomentumNetworks(model, config)
    optimizer = torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.lr, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + accelerator.process_index)
    sampler = _Sampler(len(slide_ids), generator)
    start, log = 0, []
    if ckpt is not None:
        model_state = {k[len("model.") :]: v for k, v in ckpt.weights.items() if k.startswith("model.")}
        momentum_state = {k[len("momentum.") :]: v for k, v in ckpt.weights.items() if k.startswith("momentum.")}
        model.load_state_dict(model_state, strict=True)
        momentum.load_state_dict(momentum_state, strict=True)
        optimizer.load_state_dict(ckpt.train_state["optimizer"])
        rng = ckpt.train_state["rng"]
        if isinstance(rng, list):  # one entry per process
            rng = rng[min(accelerator.process_index, len(rng) - 1)]
        _restore_rng(rng, generator, sampler)
        start, log = ckpt.step, list(ckpt.log)
    momentum.to(device)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped: PretrainModel = accelerator.unwrap_model(model)
    gather = accelerator.gather if accelerator.num_processes > 1 else None

    end = config.total_steps if stop_after is None else min(config.total_steps, stop_after)

    def checkpoint(step: int) -> None:
        # Every process has its own data stream; all of them are saved.
        states = gather_object([_rng_state(generator, sampler)]) if accelerator.num_processes > 1 else [_rng_state(generator, sampler)]
        if accelerator.is_main_process:
            state = {f"model.{k}": v for k, v in unwrapped.state_dict().items()}
            state.update({f"momentum.{k}": v for k, v in momentum.state_dict().items()})
            save_checkpoint(
                out_dir,
                step=step,
                encoder=unwrapped.encoder,
                state=state,
                config=config,
                train_state={"optimizer": optimizer.state_dict(), "rng": states if len(states) > 1 else states[0]},
                log=log,
            )
        accelerator.wait_for_everyone()

    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, disable=not (progress and accelerator.is_local_main_process)) as bar:
        task = bar.add_task("pretrain", total=end, completed=start, info="")
        model.train()
        for step in range(start, end):
            stage, phase = config.stage(step)
            lr = lr_at(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            t0 = time.perf_counter()
            totals: dict[str, float] = {}
            for _ in range(config.grad_accum):
                bases = [source.load(slide_ids[i]) for i in sampler.take(config.batch_slides)]
                with accelerator.accumulate(model):
                    if stage == "mae":
                        loss, stats = mae_forward(model, bases, phase, config, generator, device)
                    else:
                        with accelerator.autocast():
                            loss, stats = moco_forward(model, momentum, bases, config, generator, device, gather)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and config.grad_clip > 0:
                        accelerator.clip_grad_norm_(model.parameters(), config.grad_clip)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                for key, value in {"loss": loss.item(), **stats}.items():
                    totals[key] = totals.get(key, 0.0) + value / config.grad_accum
            if accelerator.num_processes > 1:
                # The log is over every process's micro-batches, not the main one's alone.
                names = sorted(totals)
                means = accelerator.reduce(torch.tensor([totals[k] for k in names], dtype=torch.float64, device=device), "mean")
                totals = dict(zip(names, means.tolist()))
            if stage == "moco":
                momentum.update(unwrapped, config.moco_momentum)
            row = {"step": step + 1, "stage": stage, "phase": phase, "lr": lr, **totals, "seconds": time.perf_counter() - t0}
            log.append(row)
            label = f"{stage}" + (f" phase {phase}" if stage == "mae" else "")
            bar.update(task, advance=1, description=label, info=f"loss {row['loss']:.4f}")
            done = step + 1
            if done % config.save_every == 0 or done == end:
                checkpoint(done)
            elif accelerator.is_main_process and done % config.log_every == 0:
                write_loss_log(out_dir, log)
    return PretrainResult(out_dir=out_dir, step=max(start, end), log=log, encoder=unwrapped.encoder)
