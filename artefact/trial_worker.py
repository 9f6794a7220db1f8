"""What runs on each Ray Train worker of a trial: the training loop, reporting to Ray
Train (metrics and checkpoints) and, on rank 0 only, to the trial's MLflow child run."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import ray.train
from ray.train import Checkpoint

from artefact.checkpoint import CHECKPOINT_FILE
from artefact.config import Config, from_dict
from artefact.loop import train
from artefact.tracking import TrialRun


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


class RayReporter:
    """Forwards each epoch to Ray Train (metrics + checkpoint) and, on rank 0, to MLflow."""

    def __init__(self, run: TrialRun | None) -> None:
        self.run = run

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        checkpoint = Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)
        if self.run is not None:
            self.run.log_epoch(metrics, step=int(metrics["epoch"]))


def train_worker(loop_config: dict[str, Any]) -> None:
    """The per-worker entry point of a trial's TorchTrainer."""
    cfg = from_dict(loop_config["config"])
    context = ray.train.get_context()
    run = None
    if context.get_world_rank() == 0 and loop_config.get("sweep") is not None:
        run = TrialRun(loop_config["sweep"], loop_config["trial_id"], trial_params(cfg))
    resume_dir = None
    checkpoint = ray.train.get_checkpoint()
    try:
        if checkpoint is not None:
            resume_dir = Path(tempfile.mkdtemp(prefix="artefact-resume-"))
            with checkpoint.as_directory() as folder:
                shutil.copy(Path(folder) / CHECKPOINT_FILE, resume_dir / CHECKPOINT_FILE)
        train(
            cfg,
            Path(loop_config["cache"]),
            RayReporter(run),
            resume_from=resume_dir / CHECKPOINT_FILE if resume_dir else None,
        )
    finally:
        if resume_dir is not None:
            shutil.rmtree(resume_dir, ignore_errors=True)
