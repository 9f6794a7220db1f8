"""What runs a trial's training loop and reports it: to Ray Train on each worker of a
DDP trial, or to Ray Tune directly for a one-worker trial; on rank 0 also to the trial's
MLflow child run."""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ray.train
import torch
import yaml
from ray import tune

from artefact.checkpoint import CHECKPOINT_FILE
from artefact.config import Config, dump_yaml, from_dict
from artefact.figures import Evaluation, evaluation_figures
from artefact.loop import train
from artefact.models import TRAINING_FLOP_FACTOR
from artefact.tracking import SweepRun, TrialRun

EVALUATION_FOLDER = "evaluation"


def trial_params(cfg: Config) -> dict[str, object]:
    """The child run's params: what distinguishes one trial from another."""
    weights = cfg.loss.weights(cfg.model.heads)
    return {
        "encoder": cfg.model.encoder,
        "arch": cfg.model.arch,
        "heads": ",".join(cfg.model.heads),
        "batch_size": cfg.train.batch_size,
        "lr": cfg.train.lr,
        "resolution": cfg.data.resolution,
        "amp": cfg.train.amp,
        "seed": cfg.train.seed,
        "epochs": cfg.train.epochs,
        "workers": cfg.resources.workers_per_trial,
        **{f"loss_weight_{head}": round(weight, 6) for head, weight in weights.items()},
    }


Send = Callable[[dict[str, float], Path | None], None]
"""Hands one epoch's metrics and checkpoint folder to Ray (Train or Tune)."""


def send_to_train(metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
    checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
    ray.train.report(metrics, checkpoint=checkpoint)


def send_to_tune(metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
    checkpoint = tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
    tune.report(metrics, checkpoint=checkpoint)


FIGURE_INTERVAL_S = 60.0
"""Least time between two drawings of a trial's best-epoch figures. They are also drawn at
the last epoch, and, best effort, when Tune stops the trial early.

Drawing and uploading them takes 1-3 s of CPU; on short CPU epochs, drawing at every
improving epoch cost a quarter of the training time (sweeps/perf_bench.py)."""


class RayReporter:
    """Forwards each epoch to Ray (metrics + checkpoint) and, on rank 0, to MLflow:
    metrics per epoch, the resolved config and model summary once, and the best epoch's
    figures, at most every ``FIGURE_INTERVAL_S`` and at the end."""

    def __init__(self, run: TrialRun | None, cfg: Config, send: Send) -> None:
        self.run = run
        self.cfg = cfg
        self.send = send
        self.described = False
        self.pending: Evaluation | None = None
        self.drawn_at = -math.inf

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None, evaluation: Evaluation | None) -> None:
        # MLflow goes first: Tune may stop the trial inside the report (ASHA, or its last
        # epoch), and nothing after it would run. A retried epoch is not logged twice
        # (``TrialRun.log_epoch``).
        if self.run is not None:
            if not self.described:
                self.run.log_text(dump_yaml(self.cfg), "config.yaml")
                self.run.log_text(model_summary(self.cfg, metrics), "model_summary.yaml")
                self.described = True
            self.pending = evaluation or self.pending
            last_epoch = int(metrics["epoch"]) >= self.cfg.train.epochs
            if last_epoch or time.monotonic() - self.drawn_at >= FIGURE_INTERVAL_S:
                self.draw_figures()
            self.run.log_epoch(metrics, step=int(metrics["epoch"]))
        self.send(metrics, checkpoint_dir)

    def draw_figures(self) -> None:
        """Log the best epoch's figures not yet logged, if any."""
        if self.run is None or self.pending is None:
            return
        with tempfile.TemporaryDirectory(prefix="artefact-figures-") as folder:
            evaluation_figures(self.pending, Path(folder))
            self.run.log_evaluation(Path(folder), f"{EVALUATION_FOLDER}/epoch_{self.pending.epoch:03d}")
        self.pending = None
        self.drawn_at = time.monotonic()


def model_summary(cfg: Config, metrics: dict[str, float]) -> str:
    """Parameters and GFLOP per image, the numbers a paper's model table needs."""
    gflop = metrics["model/gflop_per_image"]
    summary = {
        "encoder": cfg.model.encoder,
        "arch": cfg.model.arch,
        "heads": list(cfg.model.heads),
        "resolution": cfg.data.resolution,
        "parameters": int(metrics["model/params"]),
        "parameters_millions": round(metrics["model/params"] / 1e6, 3),
        "gflop_forward_per_image": round(gflop, 3),
        "gflop_training_per_image": round(TRAINING_FLOP_FACTOR * gflop, 3),
    }
    return yaml.safe_dump(summary, sort_keys=False)


def train_worker(loop_config: dict[str, Any]) -> None:
    """The per-worker entry point of a DDP trial's TorchTrainer."""
    cfg = from_dict(loop_config["config"])
    run = None
    if ray.train.get_context().get_world_rank() == 0 and loop_config.get("sweep") is not None:
        run = TrialRun(loop_config["sweep"], loop_config["trial_id"], trial_params(cfg))
    reporter = RayReporter(run, cfg, send_to_train)
    with _restored(ray.train.get_checkpoint()) as resume_from:
        train(cfg, Path(loop_config["cache"]), reporter, resume_from=resume_from)
    reporter.draw_figures()


def train_in_trial(cfg: Config, cache: Path, trial_id: str, sweep: SweepRun | None) -> None:
    """A one-worker trial, trained in the Tune trial's own process.

    Tune reuses that process for the next trial, so the torch stack is imported once per
    process instead of once per trial, and no Train controller or worker actors start:
    on 2 cores that saved most of the ~35 s each trial spent starting (see README,
    Performance). Tune restarts a failed trial from its last checkpoint, as Train would.
    """
    run = TrialRun(sweep, trial_id, trial_params(cfg)) if sweep is not None else None
    reporter = RayReporter(run, cfg, send_to_tune)
    try:
        with _restored(tune.get_checkpoint()) as resume_from:
            train(cfg, cache, reporter, resume_from=resume_from)
    finally:  # also when Tune ends the trial inside a report (ASHA, or its last epoch)
        reporter.draw_figures()
        if torch.cuda.is_available():  # the next trial in this process gets the memory back
            torch.cuda.empty_cache()


@contextmanager
def _restored(checkpoint: ray.train.Checkpoint | None) -> Iterator[Path | None]:
    """A local copy of a Ray checkpoint's file, or None for a fresh start."""
    if checkpoint is None:
        yield None
        return
    folder = Path(tempfile.mkdtemp(prefix="artefact-resume-"))
    try:
        with checkpoint.as_directory() as source:
            shutil.copy(Path(source) / CHECKPOINT_FILE, folder / CHECKPOINT_FILE)
        yield folder / CHECKPOINT_FILE
    finally:
        shutil.rmtree(folder, ignore_errors=True)
