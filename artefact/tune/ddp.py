"""Ray Train: one DDP trial's TorchTrainer and its scaling. Each worker runs
``artefact.train.loop.train`` unchanged (see ``worker``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from artefact.config import Config, ResourcesConfig
from artefact.train.checkpoint import CHECKPOINTS_KEPT

if TYPE_CHECKING:
    from artefact.tune.trial import TrialContext

TRAIN_RUN_PREFIX = "train-"


def _train_worker(loop_config: dict[str, Any]) -> None:
    """Each worker's entry point. The heavy modules (timm, SMP, albumentations, MLflow) are
    imported here, on the workers only: the Train controller and the Tune trial driver
    deserialize this function too, and would otherwise spend seconds importing them."""
    from artefact.tune.worker import train_worker

    train_worker(loop_config["config"], loop_config["context"], loop_config["trial_id"])


def scaling_config(resources: ResourcesConfig) -> ScalingConfig:
    use_gpu = resources.gpus_per_worker > 0
    per_worker: dict[str, float] = {"CPU": resources.cpus_per_worker}
    if use_gpu:
        per_worker["GPU"] = resources.gpus_per_worker
    return ScalingConfig(num_workers=resources.workers_per_trial, use_gpu=use_gpu, resources_per_worker=per_worker)


def build_trainer(cfg: Config, context: TrialContext, trial_id: str, callbacks: list | None = None) -> TorchTrainer:
    """A TorchTrainer for one trial, named after the trial so a restarted trial resumes its
    run. The config and context travel to the workers as they are (Ray pickles them)."""
    return TorchTrainer(
        _train_worker,
        train_loop_config={"config": cfg, "context": context, "trial_id": trial_id},
        torch_config=TorchConfig(backend="nccl" if cfg.resources.gpus_per_worker > 0 else "gloo"),
        scaling_config=scaling_config(cfg.resources),
        run_config=RunConfig(
            name=f"{TRAIN_RUN_PREFIX}{trial_id}",
            storage_path=str(context.storage),
            callbacks=callbacks or [],
            checkpoint_config=CheckpointConfig(
                num_to_keep=CHECKPOINTS_KEPT, checkpoint_score_attribute=cfg.sweep.metric, checkpoint_score_order="max"
            ),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
        ),
    )
