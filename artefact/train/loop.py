"""The AMP training loop: plain PyTorch, usable with or without Ray.

It reports each epoch's metrics and checkpoint through a ``Reporter`` (``reporters``), so
Ray Train, Ray Tune, a test and the single-run CLI all drive the same code. Under DDP (a
process group is already initialised, e.g. by Ray Train) it shards the data and sums
confusion counts across ranks; only rank 0 writes checkpoints.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset

from artefact.config import Config
from artefact.data.cache import check_fold, class_pixels
from artefact.data.dataset import TrainDataset, ValDataset
from artefact.errors import TrainingDiverged, TrialOutOfMemory, UserError
from artefact.losses import MultitaskLoss, class_weights
from artefact.models import build_model, count_parameters, forward_gflop
from artefact.report.figures import Evaluation
from artefact.taxonomy import HEAD_CLASS_NAMES
from artefact.train.checkpoint import EpochCheckpoint, load_checkpoint
from artefact.train.compilation import compiles
from artefact.train.evaluation import Normaliser, validate
from artefact.train.faults import planned_fault
from artefact.train.hardware import amp_dtype, configure_kernels, peak_memory_mb, reset_peak_memory, select_device
from artefact.train.timing import EpochClock

if TYPE_CHECKING:
    from artefact.train.reporters import Reporter

DIVERGENCE_CHECK_STEPS = 10
"""Steps between checks for a non-finite loss: each check waits for the GPU, so checking
every step would stall the queue of kernels the CPU has launched ahead."""


@dataclass
class Ranks:
    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> Ranks:
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def distributed(self) -> bool:
        return self.world > 1


def train(
    cfg: Config, cache: Path, reporter: Reporter, resume_from: Path | None = None, clock: EpochClock | None = None
) -> dict[str, float]:
    """Train ``cfg`` on a prepared cache; returns the last epoch's metrics. Each epoch's phases
    (loader waits, validation, checkpoint, report) are added to ``clock``, if given."""
    clock = clock or EpochClock()
    setup_started = time.perf_counter()
    check_fold(cache, cfg.data.fold)
    ranks = Ranks.current()
    _seed_everything(cfg.train.seed + ranks.rank)
    device = select_device(cfg.train.device, cfg.resources.gpus_per_worker)
    if device.type == "cuda" and ranks.distributed:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = amp_dtype(cfg.train.amp, device)
    configure_kernels(device)
    criterion = build_loss(cfg, cache, device)

    model = build_model(cfg.model, cfg.data.resolution).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    parameters = count_parameters(model)
    gflop = forward_gflop(cfg.model, cfg.data.resolution)
    net: nn.Module = DistributedDataParallel(model) if ranks.distributed else model

    data = cfg.data
    train_set = TrainDataset(cache, data.resolution, data.crops_per_image, data.in_memory, data.fold)
    val_set = ValDataset(cache, data.resolution, data.in_memory, data.fold)
    train_loader = make_train_loader(cfg, train_set, ranks, device)
    steps_per_epoch = min(len(train_loader), cfg.train.steps_per_epoch or len(train_loader))
    val_shard = Subset(val_set, list(range(ranks.rank, len(val_set), ranks.world)))
    val_ids = [val_set.rows[index]["id"] for index in val_shard.indices]
    val_loader = DataLoader(
        val_shard,
        batch_size=1,
        num_workers=cfg.data.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=cfg.data.num_workers > 0,  # not restarted every epoch (docs/performance.md)
    )

    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.train.lr, total_steps=cfg.train.epochs * steps_per_epoch
    )
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    start_epoch, best, gpu_seconds = 0, -math.inf, 0.0
    if resume_from is not None:
        start_epoch, best, gpu_seconds = _restore(resume_from, model, optimizer, scheduler, scaler)
    # Images left for this rank: each rank compiles for itself, and a resumed run has fewer to go.
    compiled = compiles(
        cfg.train.compile, device, (cfg.train.epochs - start_epoch) * steps_per_epoch * cfg.train.batch_size
    )
    if compiled:
        net = torch.compile(net)

    normalise = Normaliser(device, cfg.train.channels_last)
    fault = planned_fault(cfg)
    metrics: dict[str, float] = {}
    clock.add("setup", time.perf_counter() - setup_started)
    for epoch in range(start_epoch, cfg.train.epochs):
        if isinstance(train_loader.sampler, DistributedSampler):
            train_loader.sampler.set_epoch(epoch)
        reset_peak_memory(device)
        started = time.perf_counter()
        with _out_of_memory_is_a_trial_failure(cfg, epoch):
            train_metrics = _train_epoch(
                fault.wrap(net) if fault is not None and fault.epoch == epoch + 1 else net,
                train_loader,
                steps_per_epoch,
                optimizer,
                scheduler,
                scaler,
                normalise,
                criterion,
                dtype,
                cfg.train.grad_clip,
                ranks,
                epoch,
                clock,
            )
            train_seconds = time.perf_counter() - started
            validation_started = time.perf_counter()
            val_metrics, confusion, per_image, predictions = validate(
                model,
                val_loader,
                val_set.materials,
                val_ids if ranks.rank == 0 else [],
                normalise,
                criterion,
                dtype,
                cfg.data.resolution,
                cfg.train.batch_size,
                ranks,
                len(val_set),
            )
            clock.add("validation", time.perf_counter() - validation_started)
        images = train_metrics.pop("images")
        epoch_seconds = time.perf_counter() - started
        gpu_seconds += epoch_seconds * ranks.world * cfg.resources.gpus_per_worker * (device.type == "cuda")
        metrics = {
            "epoch": epoch + 1,
            **train_metrics,
            **val_metrics,
            "perf/img_per_s": images / train_seconds,
            "perf/epoch_s": epoch_seconds,
            # Host time spent waiting for batches: on a GPU, queued kernels may hide some of it.
            "perf/loader_wait_s": clock.seconds("loader"),
            "perf/validation_s": clock.seconds("validation"),
            "perf/gpu_hours": gpu_seconds / 3600,
            "perf/peak_mem_mb": peak_memory_mb(device),
            "perf/workers": ranks.world,
            "perf/compiled": float(compiled),
            "model/params": parameters,
            "model/gflop_per_image": gflop,
        }
        score = metrics.get(cfg.sweep.metric, -math.inf)
        evaluation = None
        if score > best and ranks.rank == 0:
            evaluation = Evaluation(epoch + 1, {h: c.cpu().numpy() for h, c in confusion.items()}, predictions)
        best = max(best, score)
        checkpoint = None
        if ranks.rank == 0:
            with clock.phase("checkpoint"):
                state = {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "epoch": epoch,
                    "best": best,
                    "gpu_seconds": gpu_seconds,
                }
                checkpoint = EpochCheckpoint(state, per_image)
        with clock.phase("report"):
            reporter.report(metrics, checkpoint, evaluation)
        checkpoint = None  # its host copies go once the reporter is done with them
        clock.add("epoch", time.perf_counter() - started)
        clock.lap()
    return metrics


@contextmanager
def _out_of_memory_is_a_trial_failure(cfg: Config, epoch: int) -> Iterator[None]:
    """CUDA's out-of-memory error, as a trial failure that names the configuration to change."""
    try:
        yield
    except torch.OutOfMemoryError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else "out of memory"
        raise TrialOutOfMemory(
            f"out of GPU memory at epoch {epoch + 1} with model.encoder={cfg.model.encoder},"
            f" model.arch={cfg.model.arch}, train.batch_size={cfg.train.batch_size},"
            f" data.resolution={cfg.data.resolution}, train.amp={cfg.train.amp}; lower the batch size or the"
            f" resolution ({first_line})"
        ) from None


def build_loss(cfg: Config, cache: Path, device: torch.device) -> MultitaskLoss:
    """The loss of ``cfg``, for training and validation: its per-class weights (on ``device``)
    come from the cache's training-side pixel counts, once per run."""
    weights = None
    if cfg.loss.class_weights != "none":
        pixels = class_pixels(cache, cfg.data.fold)
        weights = {
            head: torch.tensor(
                class_weights(pixels[head], cfg.loss.class_weights, cfg.loss.class_weight_clip), device=device
            )
            for head in cfg.model.heads
        }
    return MultitaskLoss(cfg.loss.weights(cfg.model.heads), cfg.loss.kind, weights)


def class_weight_table(cfg: Config, cache: Path) -> list[dict[str, object]]:
    """One row per head and class of the model: training pixels, their share of the head's
    labelled training pixels, and the loss weight ``build_loss`` gives the class."""
    pixels = class_pixels(cache, cfg.data.fold)
    rows: list[dict[str, object]] = []
    for head in cfg.model.heads:
        counts = pixels[head]
        weights = class_weights(counts, cfg.loss.class_weights, cfg.loss.class_weight_clip)
        total = sum(counts) or 1
        for class_id, (name, count, weight) in enumerate(zip(HEAD_CLASS_NAMES[head], counts, weights, strict=True)):
            rows.append(
                {
                    "head": head,
                    "class_id": class_id,
                    "class_name": name,
                    "train_pixels": count,
                    "frequency": count / total,
                    "weight": weight,
                }
            )
    return rows


CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "scaler", "epoch", "best")


def _restore(path: Path, model, optimizer, scheduler, scaler) -> tuple[int, float, float]:
    """Load a checkpoint into the training state; returns (first epoch to run, best metric,
    GPU-seconds spent so far: a restarted trial's cost counts its earlier attempts)."""
    state = load_checkpoint(path)
    missing = [key for key in CHECKPOINT_KEYS if key not in state]
    if missing:
        raise UserError(f"checkpoint {path} lacks {missing}; it was not written by this training loop.")
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        raise UserError(f"checkpoint {path} does not fit this model (another encoder or heads?): {error}") from None
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    saved = state["scheduler"]
    if saved.get("total_steps") == scheduler.total_steps:
        scheduler.load_state_dict(saved)
    else:
        # More (or fewer) epochs than before: keep the new schedule's shape, continue from the step reached.
        scheduler.last_epoch = saved["last_epoch"]
    return state["epoch"] + 1, state["best"], state.get("gpu_seconds", 0.0)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _worker_seed(worker_id: int) -> None:
    info = torch.utils.data.get_worker_info()
    np.random.seed(info.seed % 2**32)
    random.seed(info.seed)
    info.dataset.reseed(info.seed)


def make_train_loader(cfg: Config, dataset: TrainDataset, ranks: Ranks, device: torch.device) -> DataLoader:
    sampler = DistributedSampler(dataset, ranks.world, ranks.rank, seed=cfg.train.seed) if ranks.distributed else None
    loader = DataLoader(
        dataset,
        batch_size=cfg.train.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        drop_last=True,
        num_workers=cfg.data.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=cfg.data.num_workers > 0,
        worker_init_fn=_worker_seed,
    )
    if len(loader) == 0:
        raise UserError(
            f"the training side has {len(dataset)} crops per epoch per worker, fewer than train.batch_size ="
            f" {cfg.train.batch_size} x {ranks.world} worker(s); lower the batch size or raise data.crops_per_image."
        )
    return loader


def _train_epoch(
    net,
    loader,
    steps,
    optimizer,
    scheduler,
    scaler,
    normalise,
    criterion,
    dtype,
    grad_clip,
    ranks: Ranks,
    epoch: int,
    clock: EpochClock,
) -> dict[str, float]:
    net.train()
    device = normalise.device
    heads = list(criterion.head_weights)
    totals = torch.zeros(len(heads) + 1, device=device)
    images = 0
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    for step, (batch, masks) in enumerate(_take(loader, steps, clock)):
        inputs = normalise.images(batch)
        targets = normalise.targets(masks, heads)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            outputs = net(inputs)
        loss, per_head = criterion(outputs, targets)
        nonfinite |= ~torch.isfinite(loss.detach())
        if ((step + 1) % DIVERGENCE_CHECK_STEPS == 0 or step + 1 == steps) and nonfinite.item():
            raise TrainingDiverged(f"the training loss became NaN or infinite at epoch {epoch + 1}, by step {step + 1}")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        totals += torch.stack([loss.detach(), *(v.detach() for v in per_head.values())])
        images += batch.shape[0]
    counts = torch.tensor([float(steps), float(images)], device=device)
    if ranks.distributed:
        dist.all_reduce(totals)
        dist.all_reduce(counts)
    means = (totals / counts[0]).tolist()
    result = {"train/loss": means[0], **{f"train/loss_{head}": v for head, v in zip(heads, means[1:], strict=True)}}
    result["images"] = counts[1].item()
    return result


def _take(loader: DataLoader, steps: int, clock: EpochClock) -> Iterator:
    """The first ``steps`` batches; the time spent waiting for them is the clock's "loader"."""
    batches = iter(loader)
    for _ in range(steps):
        with clock.phase("loader"):
            batch = next(batches, None)
        if batch is None:
            return
        yield batch
