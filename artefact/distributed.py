"""Ray Train: the training loop on the workers of one trial (DDP), and its scaling.

With ``search``, the only module that imports Ray. Each worker runs ``artefact.loop.train``
unchanged; this module only adapts its reporter to ``ray.train.report`` and, on rank 0,
to the trial's MLflow child run.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import ray.train
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from artefact.checkpoint import CHECKPOINT_FILE
from artefact.config import Config, ResourcesConfig, from_dict, to_dict
from artefact.loop import train
from artefact.tracking import SweepRun, TrialRun

TRAIN_RUN_PREFIX = "train-"


def trial_params(cfg: Config, seed_label: int | None = None) -> dict[str, object]:
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


def scaling_config(resources: ResourcesConfig) -> ScalingConfig:
    use_gpu = resources.gpus_per_worker > 0
    per_worker: dict[str, float] = {"CPU": resources.cpus_per_worker}
    if use_gpu:
        per_worker["GPU"] = resources.gpus_per_worker
    return ScalingConfig(num_workers=resources.workers_per_trial, use_gpu=use_gpu, resources_per_worker=per_worker)


def build_trainer(
    cfg: Config,
    cache: Path,
    storage: Path,
    trial_id: str,
    sweep: SweepRun | None,
    callbacks: list | None = None,
    max_failures: int = 2,
) -> TorchTrainer:
    """A TorchTrainer for one trial, named after the trial so a restarted trial resumes its run."""
    return TorchTrainer(
        train_worker,
        train_loop_config={"config": to_dict(cfg), "cache": str(cache), "sweep": sweep, "trial_id": trial_id},
        torch_config=TorchConfig(backend="nccl" if cfg.resources.gpus_per_worker > 0 else "gloo"),
        scaling_config=scaling_config(cfg.resources),
        run_config=RunConfig(
            name=f"{TRAIN_RUN_PREFIX}{trial_id}",
            storage_path=str(storage),
            callbacks=callbacks or [],
            checkpoint_config=CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute=cfg.sweep.metric, checkpoint_score_order="max"
            ),
            failure_config=FailureConfig(max_failures=max_failures),
        ),
    )
