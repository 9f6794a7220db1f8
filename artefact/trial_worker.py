"""What runs on each Ray Train worker of a trial: the training loop, reporting to Ray
Train (metrics and checkpoints) and, on rank 0 only, to the trial's MLflow child run."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import ray.train
import yaml
from ray.train import Checkpoint

from artefact.checkpoint import CHECKPOINT_FILE
from artefact.config import Config, dump_yaml, from_dict
from artefact.figures import Evaluation, evaluation_figures
from artefact.loop import train
from artefact.tracking import TrialRun

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


class RayReporter:
    """Forwards each epoch to Ray Train (metrics + checkpoint) and, on rank 0, to MLflow:
    metrics per epoch, the resolved config and model summary once, and the best epoch's figures."""

    def __init__(self, run: TrialRun | None, cfg: Config) -> None:
        self.run = run
        self.cfg = cfg
        self.described = False

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None, evaluation: Evaluation | None) -> None:
        # Artifacts go before the Ray report: ASHA may stop the trial as soon as Tune sees this
        # epoch. The epoch's metrics go after it, so a retried epoch is never logged twice.
        if self.run is not None:
            if not self.described:
                self.run.log_text(dump_yaml(self.cfg), "config.yaml")
                self.run.log_text(model_summary(self.cfg, metrics), "model_summary.yaml")
                self.described = True
            if evaluation is not None:
                with tempfile.TemporaryDirectory(prefix="artefact-figures-") as folder:
                    evaluation_figures(evaluation, Path(folder))
                    self.run.log_evaluation(Path(folder), f"{EVALUATION_FOLDER}/epoch_{evaluation.epoch:03d}")
        checkpoint = Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)
        if self.run is not None:
            self.run.log_epoch(metrics, step=int(metrics["epoch"]))


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
        "gflop_training_per_image": round(3 * gflop, 3),
    }
    return yaml.safe_dump(summary, sort_keys=False)


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
            RayReporter(run, cfg),
            resume_from=resume_dir / CHECKPOINT_FILE if resume_dir else None,
        )
    finally:
        if resume_dir is not None:
            shutil.rmtree(resume_dir, ignore_errors=True)
