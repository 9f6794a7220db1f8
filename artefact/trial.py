"""The function each Tune trial runs, apart from ``search`` (Optuna, the searcher, the
scheduler): a trial process imports this module to unpickle that function, so its first
trial loads only Tune, MLflow and the config here, and the training stack later, with the
collector paused (``heap``). With ``search`` in its place, a trial process spent about 1 s
more on imports (7.7 s against 6.4 s on 2 cores, measured alone)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ray import tune

from artefact.config import Config, from_dict
from artefact.heap import collector_paused
from artefact.tracking import SweepRun, set_best_checkpoint

SEARCHED_LOSS_FIELDS = {"loss_kind": "kind", "class_weights": "class_weights"}
"""Trial params (``sweep.search_loss_kinds``, ``sweep.search_class_weights``) -> their ``loss.*`` field."""


def in_process(cfg: Config) -> bool:
    """Whether a trial trains in its Tune process (one worker) rather than under a TorchTrainer."""
    return cfg.resources.workers_per_trial == 1


def apply_trial_params(base: Config, params: dict[str, Any]) -> Config:
    """The base config with one trial's sampled values filled in, at the encoder's batch size."""
    train: dict[str, Any] = {key: params[key] for key in ("batch_size", "lr", "seed") if key in params}
    train["batch_size"], train["lr"] = base.sweep.scaled_batch(
        params["encoder"], train.get("batch_size", base.train.batch_size), train.get("lr", base.train.lr)
    )
    sections: dict[str, Any] = {"model": {"encoder": params["encoder"]}, "train": train}
    loss = {field: params[name] for name, field in SEARCHED_LOSS_FIELDS.items() if name in params}
    raw_weights = {head: params[f"w_{head}"] for head in base.model.heads if f"w_{head}" in params}
    if raw_weights:
        loss.update(simplex_weights(raw_weights))
    if loss:
        sections["loss"] = loss
    return base.replace(**sections)


def simplex_weights(raw: dict[str, float]) -> dict[str, float]:
    """Uniform (0, 1] draws -> weights on the simplex (a Dirichlet(1) sample via -log u)."""
    logs = {head: -math.log(max(value, 1e-12)) for head, value in raw.items()}
    total = sum(logs.values()) or 1.0
    return {head: value / total for head, value in logs.items()}


def run_trial(params: dict[str, Any], base: dict[str, Any], cache: str, storage: str, sweep: SweepRun | None) -> None:
    """One Tune trial: train here (one worker), or fit a TorchTrainer whose reports flow back to Tune."""
    cfg = apply_trial_params(from_dict(base), params)
    trial_id = tune.get_context().get_trial_id()
    if in_process(cfg):
        # The training modules (loop, data, figures) load at a trial process's first trial.
        with collector_paused():
            from artefact.trial_worker import train_in_trial

        train_in_trial(cfg, Path(cache), trial_id, sweep)
        return
    with collector_paused():
        from ray.tune.integration.ray_train import TuneReportCallback

        from artefact.distributed import build_trainer

    result = build_trainer(cfg, Path(cache), Path(storage), trial_id, sweep, callbacks=[TuneReportCallback()]).fit()
    if sweep is not None and result.best_checkpoints:
        best, _ = max(result.best_checkpoints, key=lambda pair: pair[1].get(cfg.sweep.metric, -math.inf))
        set_best_checkpoint(sweep, trial_id, best.path)
