"""Ray Train: one trial's TorchTrainer (DDP over its workers) and its scaling.

With ``search`` and ``trial_worker``, the only modules that import Ray. Each worker runs
``artefact.loop.train`` unchanged (see ``trial_worker``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from artefact.checkpoint import CHECKPOINTS_KEPT
from artefact.config import Config, ResourcesConfig, to_dict

if TYPE_CHECKING:
    from artefact.tracking import SweepRun

TRAIN_RUN_PREFIX = "train-"


def _train_worker(loop_config: dict[str, Any]) -> None:
    """Each worker's entry point. The heavy modules (timm, SMP, albumentations, MLflow) are
    imported here, on the workers only: the Train controller and the Tune trial driver
    deserialize this function too, and would otherwise spend seconds importing them."""
    from artefact.trial_worker import train_worker

    train_worker(loop_config)


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
) -> TorchTrainer:
    """A TorchTrainer for one trial, named after the trial so a restarted trial resumes its run."""
    return TorchTrainer(
        _train_worker,
        train_loop_config={"config": to_dict(cfg), "cache": str(cache), "sweep": sweep, "trial_id": trial_id},
        torch_config=TorchConfig(backend="nccl" if cfg.resources.gpus_per_worker > 0 else "gloo"),
        scaling_config=scaling_config(cfg.resources),
        run_config=RunConfig(
            name=f"{TRAIN_RUN_PREFIX}{trial_id}",
            storage_path=str(storage),
            callbacks=callbacks or [],
            checkpoint_config=CheckpointConfig(
                num_to_keep=CHECKPOINTS_KEPT, checkpoint_score_attribute=cfg.sweep.metric, checkpoint_score_order="max"
            ),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
        ),
    )
