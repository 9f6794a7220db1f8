"""The function each Tune trial runs, apart from ``tuner`` (Optuna, the searcher, the
scheduler): a trial process imports this module to unpickle that function, so its first
trial loads only Tune, MLflow and the config here, and the training stack later, with the
collector paused (``heap``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import tune

from artefact.config import Config
from artefact.heap import collector_paused
from artefact.tracking.trials import set_best_checkpoint
from artefact.tracking.vocabulary import SweepRun
from artefact.tune.space import apply_trial_params


@dataclass(frozen=True)
class TrialContext:
    """Where every trial of a sweep reads and logs, beside its config: the prepared cache,
    Ray Train's storage for DDP trials, the sweep's MLflow run (None: not logged) and name.
    Small and picklable: Tune and Train send it to the trials as it is."""

    cache: Path
    storage: Path
    sweep: SweepRun | None = None
    name: str | None = None
    """The sweep's name: its trials share compiled code in a folder so named on each node."""
    unsent: Path | None = None
    """Where a trial records the epochs its MLflow run still lacks at its end (``UNSENT_FOLDER``)."""


def in_process(cfg: Config) -> bool:
    """Whether a trial trains in its Tune process rather than under a TorchTrainer."""
    return cfg.resources.trainer == "in_process"


def run_trial(params: dict[str, Any], base: Config, context: TrialContext) -> None:
    """One Tune trial: train here (one worker), or fit a TorchTrainer whose reports flow back to Tune."""
    cfg = apply_trial_params(base, params)
    trial_id = tune.get_context().get_trial_id()
    if in_process(cfg):
        # The training modules (loop, data, figures) load at a trial process's first trial.
        with collector_paused():
            from artefact.tune.worker import train_in_trial

        train_in_trial(cfg, context, trial_id)
        return
    with collector_paused():
        from ray.tune.integration.ray_train import TuneReportCallback

        from artefact.tune.ddp import build_trainer

    result = build_trainer(cfg, context, trial_id, callbacks=[TuneReportCallback()]).fit()
    if context.sweep is not None and result.best_checkpoints:
        best, _ = max(result.best_checkpoints, key=lambda pair: pair[1].get(cfg.sweep.metric, -math.inf))
        set_best_checkpoint(context.sweep, trial_id, best.path)
