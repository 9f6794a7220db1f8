"""The trial item: one trial at the ``v100s-x2`` profile's epoch shape on a data set of
ARTeFACT's size (its batch, its steps per epoch, validation of whole images every epoch,
checkpoints, figures and MLflow on), next to the bare work it contains: the same training
steps and validation forward passes, timed alone. Where the difference goes is read from
the trial's ``EpochClock``.

Without a GPU the model shrinks (a tiny timm encoder at 64 px) but the epoch keeps its step
count, so the per-epoch costs weigh as much as they would there, or more.
"""

from __future__ import annotations

import shutil
import statistics
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from artefact.config import Config
from artefact.config_files import load_config, profile_file
from artefact.data.dataset import TrainDataset, ValDataset, load_split
from artefact.models import build_model
from artefact.train.checkpoint import CHECKPOINT_FILE, CHECKPOINTS_KEPT, EpochCheckpoint
from artefact.train.evaluation import Normaliser, segment
from artefact.train.hardware import select_device
from artefact.train.loop import train
from artefact.train.reporters import TrialReporter, trial_params
from artefact.train.timing import training_seconds
from bench.throughput import bare_step, loop_options, steps_per_epoch, timed_steps

TRIAL_PROFILE = "v100s-x2"
ARTEFACT_TRAIN_IMAGES = 330
"""Source images on the training side of a split of ARTeFACT's 418 (the rest validate or test)."""
ARTEFACT_VAL_IMAGES = 65
CPU_MODEL = {"encoder": "tu-test_convnext", "pretrained": False}
CPU_DATA = {"resolution": 64, "max_side": 160}


def trial_config(epochs: int, overrides: list[str]) -> Config:
    """The trial profile (with the benchmark's ``--set`` overrides: ``train.amp=bf16`` on an
    H100, say) at its own batch, crops and loader workers, with the first encoder it
    searches or ``--set model.encoder=``'s; on a machine without a GPU, with the tiny encoder
    (unless set) and small images, loaded in the training process: there the
    model already uses every core, and a loader worker only takes CPU from it (on 2 cores, one
    worker made the training steps 9% slower and validation 0.3 s longer per epoch)."""
    _, path = profile_file(TRIAL_PROFILE)
    cfg = load_config(path, overrides)
    encoder_chosen = any(override.split("=", 1)[0].strip() == "model.encoder" for override in overrides)
    cfg = cfg.replace(
        model={"encoder": cfg.model.encoder if encoder_chosen else cfg.sweep.encoders[0], "pretrained": False},
        train={"epochs": epochs},
        data={"val_fraction": ARTEFACT_VAL_IMAGES / (ARTEFACT_TRAIN_IMAGES + ARTEFACT_VAL_IMAGES)},
    )
    if torch.cuda.is_available():
        return cfg.replace(resources={"gpus_per_worker": 1})
    return cfg.replace(
        model={"pretrained": False} if encoder_chosen else CPU_MODEL,
        data={**CPU_DATA, "num_workers": 0},
        train={"amp": "auto", "channels_last": False},
        resources={"gpus_per_worker": 0, "gpu_arch": None},
    )


def trial_cache(cfg: Config, workdir: Path, scale: float = 1.0) -> Path:
    """A synthetic data set of ARTeFACT's size (``scale`` of it, for a quick run) at the
    profile's image sizes, prepared as a sweep prepares it."""
    from artefact.data.prepare import params_from, prepare
    from artefact.data.sources.synthetic import generate

    count = max(30, round((ARTEFACT_TRAIN_IMAGES + ARTEFACT_VAL_IMAGES) * scale))
    size = (cfg.data.max_side // 2, cfg.data.max_side)
    source = generate(workdir / "trial-source", count=count, size=size, seed=0)
    return prepare(source, workdir / "trial-cache", params_from(cfg.data), log=lambda _: None)


class _RayLikeStorage:
    """Where a trial's reported checkpoint goes, done the way Ray does it, without a Ray
    session: written to a temporary folder, copied into the trial's storage with
    ``pyarrow.fs.copy_files`` (Ray's ``StorageContext``), ``CHECKPOINTS_KEPT`` kept. Under Ray
    Train (the GPU profiles' ``resources.trainer: ray_train``) one background thread writes
    and copies (``send_to_train``); under Tune alone both happen inside the report."""

    def __init__(self, folder: Path, in_background: bool) -> None:
        self.folder = folder
        self.kept: list[Path] = []
        self.uploads = ThreadPoolExecutor(max_workers=1) if in_background else None
        self.pending: list[Future] = []
        self.seconds: list[float] = []

    def send(self, metrics: dict[str, float], checkpoint: EpochCheckpoint | None) -> None:
        if checkpoint is None:
            return
        target = self.folder / f"checkpoint_{len(self.kept):06d}"
        self.kept.append(target)
        if self.uploads is None:
            self._keep(checkpoint, target)
        else:
            self.pending.append(self.uploads.submit(self._keep, checkpoint, target))

    def wait(self) -> None:
        """Until every copy has finished (Train waits so when a trial's loop returns)."""
        for upload in self.pending:
            upload.result()
        self.pending.clear()

    def _keep(self, checkpoint: EpochCheckpoint, target: Path) -> None:
        import pyarrow.fs

        started = time.perf_counter()
        target.mkdir(parents=True)
        with checkpoint.written() as folder:
            pyarrow.fs.copy_files(str(folder), str(target))
        for old in self.kept[:-CHECKPOINTS_KEPT]:
            shutil.rmtree(old, ignore_errors=True)
        self.seconds.append(time.perf_counter() - started)


def measure_trial(cfg: Config, cache: Path, workdir: Path) -> dict[str, object]:
    """Wall time of one logged, checkpointed trial of ``cfg`` (``trial_config``) against its
    bare work, and the per-epoch breakdown of the difference."""
    from artefact.tracking.store import open_sweep
    from artefact.tracking.trials import TrialRun

    epochs = cfg.train.epochs
    sweep = open_sweep(f"sqlite:///{(workdir / 'trial-mlflow.db').resolve()}", "perf-trial", {})
    storage = _RayLikeStorage(workdir / "trial-storage", in_background=cfg.resources.trainer == "ray_train")
    train_set = TrainDataset(cache, cfg.data.resolution, cfg.data.crops_per_image)
    steps = steps_per_epoch(cfg, train_set)
    # The bare work runs after each of the trial's epochs, inside its report: this machine's
    # speed drifts by 10% from minute to minute, and work timed in the same minute drifts with
    # it. Its time is taken out of the trial's, and out of the figures' drawing interval. The
    # checkpoint goes to storage after it, so that a background copy runs beside the trial's
    # next epoch, as under Ray Train, not beside the bare epoch; a copy still running at the
    # next report is waited for, and that wait counts.
    bare_epoch = _BareEpoch(cfg, cache, steps)
    bare_runs: list[tuple[float, float]] = []

    def send(metrics: dict[str, float], checkpoint: EpochCheckpoint | None) -> None:
        storage.wait()
        started = time.perf_counter()
        bare_runs.append(bare_epoch())
        seconds = time.perf_counter() - started
        reporter.clock.add("bare", seconds)
        reporter.drawn_at += seconds
        storage.send(metrics, checkpoint)

    reporter = TrialReporter(TrialRun(sweep, "trial", trial_params(cfg)), cfg, send, cache)
    started = time.perf_counter()
    train(cfg, cache, reporter, clock=reporter.clock)
    reporter.close()
    storage.wait()
    bare_total = sum(epoch["bare"] for epoch in reporter.clock.epochs)
    wall = time.perf_counter() - started - bare_total
    step_seconds = statistics.fmean(step for step, _ in bare_runs)
    validation_seconds = statistics.fmean(validation for _, validation in bare_runs)
    bare = epochs * (steps * step_seconds + validation_seconds)

    clock = reporter.clock.epochs

    def mean(name: str) -> float:
        return statistics.fmean(epoch.get(name, 0.0) for epoch in clock)

    train_seconds = [training_seconds(epoch) for epoch in clock]
    per_epoch = {
        "steps_bare": steps * step_seconds,
        "steps_extra": statistics.fmean(train_seconds) - mean("loader") - steps * step_seconds,
        "loader_wait": mean("loader"),
        "validation_bare": validation_seconds,
        "validation_extra": mean("validation") - validation_seconds,
        "checkpoint": mean("checkpoint"),
        "mlflow": mean("mlflow"),
        "figures": mean("figures"),
        "send": mean("send") - mean("bare"),
        "report_other": mean("report") - mean("mlflow") - mean("figures") - mean("send"),
    }
    checkpoint_file = storage.kept[-1] / CHECKPOINT_FILE
    return {
        "profile": TRIAL_PROFILE,
        "encoder": cfg.model.encoder,
        "resolution": cfg.data.resolution,
        "batch_size": cfg.train.batch_size,
        "loader_workers": cfg.data.num_workers,
        "train_images": len(train_set.rows),
        "val_images": len(load_split(cache, "val")),
        "steps_per_epoch": steps,
        "epochs": epochs,
        "wall_s": round(wall, 2),
        "bare_s": round(bare, 2),
        "wall_over_bare": round(wall / bare, 3),
        "overhead_share": round((wall - bare) / wall, 3),
        "setup_s": round(clock[0].get("setup", 0.0), 2),
        "close_s": round(wall - sum(e.get("setup", 0.0) + e["epoch"] - e["bare"] for e in clock), 2),
        "epoch_s": [round(e["epoch"] - e["bare"], 2) for e in clock],
        # The bare epoch timed after each of the trial's: how much this machine drifted.
        "bare_epoch_s": [round(steps * step + validation, 2) for step, validation in bare_runs],
        "per_epoch_s": {name: round(value, 3) for name, value in per_epoch.items()},
        "checkpoint_mb": round(checkpoint_file.stat().st_size / 2**20, 1),
        "checkpoint_copy": "background" if storage.uploads is not None else "in the report",
        # Writing one checkpoint and copying it to storage (beside the next epoch, in the background).
        "checkpoint_write_and_copy_s": round(statistics.fmean(storage.seconds), 3),
    }


class _BareEpoch:
    """One epoch's bare work, timed: (one training step, one validation pass). The step is the
    bare loop's (model, loss, AMP, AdamW on a batch already on the device); the validation
    pass is its forward passes alone, every validation image already on the device and tiled
    as validation tiles it, without loss or counts.

    Built, then warmed up by one whole untimed epoch before the trial starts. A fresh
    process's first epoch is slower whatever trains in it (kernel and allocator caches; on 2
    CPU cores a bare loop's first 20 steps took 0.8-1.6 s longer than its later ones), and
    those caches are the process's: only one of the two sides could be timed cold, so
    neither is."""

    def __init__(self, cfg: Config, cache: Path, steps: int) -> None:
        self.steps = steps
        self.batch_size = cfg.train.batch_size
        self.resolution = cfg.data.resolution
        self.device = select_device(cfg.train.device)
        self.dtype, options = loop_options(cfg, cfg.train.epochs * steps)
        self.step = bare_step(cfg, self.dtype, **options)
        self.model = build_model(cfg.model, cfg.data.resolution).to(self.device).eval()
        if cfg.train.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.normalise = Normaliser(self.device, cfg.train.channels_last)
        val_set = ValDataset(cache, cfg.data.resolution)
        self.images = [val_set[index][0].unsqueeze(0).to(self.device) for index in range(len(val_set))]
        self()

    @torch.no_grad()
    def validate_one(self, image: torch.Tensor) -> None:
        segment(self.model, image, self.normalise, self.dtype, self.resolution, self.batch_size)

    def __call__(self) -> tuple[float, float]:
        step = timed_steps(self.step, self.steps, 0, self.device) / self.steps
        images = iter(self.images)
        validation = timed_steps(lambda: self.validate_one(next(images)), len(self.images), 0, self.device)
        return step, validation
