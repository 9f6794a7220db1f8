"""Ray Tune: the trials of a sweep, the Optuna search space, ASHA, and resume.

Each trial is a Tune *function* (``trial.run_trial``). A one-worker trial trains in that
function's own process, which Tune reuses from trial to trial (``trial_worker``). A DDP
trial (Train V2 style) builds and fits a TorchTrainer named after the trial id (the
deprecated ``Tuner(trainer)`` is not used); its driver reserves almost no CPU, and
``max_concurrent_trials`` is derived from the cluster's resources, so trial drivers can
never hold the CPUs their workers need.
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import ray
from ray import tune
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch

from artefact.checkpoint import CHECKPOINTS_KEPT
from artefact.config import Config, to_dict
from artefact.errors import UserError
from artefact.tracking import SweepRun
from artefact.trial import in_process, run_trial, simplex_weights

TRIAL_DRIVER_CPU = 0.01
"""A DDP trial's driver only waits on its TorchTrainer; {'cpu': 0} is refused by Ray."""
TUNE_FOLDER = "tune"
STATE_SAVE_PERIOD_S = 1
TRAIN_FOLDER = "train"
TRIAL_NAME = "_run_trial"
"""Tune's name for the trials' function (``trial.run_trial``), which also names their
folders. A sweep resumes only under the name it started with, and sweeps started before
the function moved out of this module were named after it, so the name stays."""


def space_description(cfg: Config) -> dict[str, Any]:
    """The searched space, as logged to MLflow and compared on --resume."""
    sweep = cfg.sweep
    if sweep.mode == "fair":
        return {"mode": "fair", "encoders": list(sweep.encoders), "seeds": sweep.seeds}
    return {
        "mode": "search",
        "encoders": list(sweep.encoders),
        "batch_sizes": list(sweep.batch_sizes),
        "lr": [sweep.lr_min, sweep.lr_max],
        "loss_weights": _searches_weights(cfg),
        "loss_kinds": list(sweep.search_loss_kinds) or [cfg.loss.kind],
        "class_weights": list(sweep.search_class_weights) or [cfg.loss.class_weights],
    }


def _searches_weights(cfg: Config) -> bool:
    return cfg.sweep.search_loss_weights and len(cfg.model.heads) > 1


@dataclass(frozen=True)
class SearchSpace:
    """Optuna define-by-run space; a picklable object because Tune checkpoints the searcher."""

    encoders: tuple[str, ...]
    batch_sizes: tuple[int, ...]
    lr_min: float
    lr_max: float
    weight_heads: tuple[str, ...]
    loss_kinds: tuple[str, ...] = ()
    class_weights: tuple[str, ...] = ()
    """Choices for the trial params ``loss_kind`` and ``class_weights``; empty = not searched."""

    @classmethod
    def from_config(cls, cfg: Config) -> SearchSpace:
        sweep = cfg.sweep
        heads = cfg.model.heads if _searches_weights(cfg) else ()
        return cls(
            sweep.encoders,
            sweep.batch_sizes,
            sweep.lr_min,
            sweep.lr_max,
            heads,
            sweep.search_loss_kinds,
            sweep.search_class_weights,
        )

    def __call__(self, trial: optuna.Trial) -> None:
        trial.suggest_categorical("encoder", list(self.encoders))
        trial.suggest_categorical("batch_size", list(self.batch_sizes))
        trial.suggest_float("lr", self.lr_min, self.lr_max, log=True)
        for head in self.weight_heads:
            trial.suggest_float(f"w_{head}", 1e-6, 1.0)
        if self.loss_kinds:
            trial.suggest_categorical("loss_kind", list(self.loss_kinds))
        if self.class_weights:
            trial.suggest_categorical("class_weights", list(self.class_weights))


def default_points(cfg: Config) -> list[dict[str, Any]]:
    """The base configuration (weights 0.2/0.3/0.5) on each encoder, evaluated first.

    The search is measured against these, and every listed encoder gets at least one trial.
    """
    return [_default_point(cfg, encoder) for encoder in cfg.sweep.encoders][: cfg.sweep.trials]


def _default_point(cfg: Config, encoder: str) -> dict[str, Any]:
    point: dict[str, Any] = {
        "encoder": encoder,
        "batch_size": cfg.train.batch_size
        if cfg.train.batch_size in cfg.sweep.batch_sizes
        else cfg.sweep.batch_sizes[0],
        "lr": min(max(cfg.train.lr, cfg.sweep.lr_min), cfg.sweep.lr_max),
    }
    if _searches_weights(cfg):
        weights = cfg.loss.weights(cfg.model.heads)
        point.update({f"w_{head}": math.exp(-weight) for head, weight in weights.items()})
    for name, base, choices in (
        ("loss_kind", cfg.loss.kind, cfg.sweep.search_loss_kinds),
        ("class_weights", cfg.loss.class_weights, cfg.sweep.search_class_weights),
    ):
        if choices:
            point[name] = base if base in choices else choices[0]
    return point


def trial_count(cfg: Config) -> int:
    """The number of trials a sweep asks for."""
    if cfg.sweep.mode == "fair":
        return len(cfg.sweep.encoders) * cfg.sweep.seeds
    return cfg.sweep.trials


def max_concurrent_trials(cfg: Config, resources: dict[str, float]) -> int:
    """How many trials fit at once, counting every worker's CPUs and GPUs."""
    res = cfg.resources
    cpus = res.workers_per_trial * res.cpus_per_worker + (0 if in_process(cfg) else TRIAL_DRIVER_CPU)
    limit = math.floor(resources.get("CPU", 0) / cpus + 1e-9)
    if res.gpus_per_worker > 0:
        gpus = res.workers_per_trial * res.gpus_per_worker
        limit = min(limit, math.floor(resources.get("GPU", 0) / gpus + 1e-9))
    if limit < 1:
        raise UserError(
            f"one trial needs {res.workers_per_trial} worker(s) x {res.cpus_per_worker} CPU"
            f" and {res.gpus_per_worker} GPU each, but the cluster has {resources.get('CPU', 0):g} CPUs and"
            f" {resources.get('GPU', 0):g} GPUs; lower resources.* in the profile or use a bigger allocation."
        )
    return limit


def _trainable(cfg: Config, cache: Path, sweep_dir: Path, sweep: SweepRun | None):
    trainable = tune.with_parameters(
        run_trial, base=to_dict(cfg), cache=str(cache), storage=str(sweep_dir / TRAIN_FOLDER), sweep=sweep
    )
    res = cfg.resources
    if in_process(cfg):
        return tune.with_resources(trainable, {"cpu": res.cpus_per_worker, "gpu": res.gpus_per_worker})
    return tune.with_resources(trainable, {"cpu": TRIAL_DRIVER_CPU})


class ResumableOptunaSearch(OptunaSearch):
    """OptunaSearch that survives a re-run of a trial the study already holds as finished.

    Killed between Optuna's record of a finished trial and Tune's next state save, a sweep
    resumes that trial from its last Tune checkpoint and reports its last epoch again. The
    study keeps its first record; Optuna would otherwise fail the whole sweep.
    """

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        try:
            super().on_trial_result(trial_id, result)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass


def _tune_config(cfg: Config, sweep_dir: Path, name: str, concurrency: int) -> tune.TuneConfig:
    sweep = cfg.sweep
    if sweep.mode == "fair":
        return tune.TuneConfig(
            num_samples=1, scheduler=FIFOScheduler(), max_concurrent_trials=concurrency, reuse_actors=True
        )
    scheduler = (
        ASHAScheduler(
            time_attr="training_iteration",
            max_t=cfg.train.epochs,
            grace_period=min(sweep.grace_period, cfg.train.epochs),
            reduction_factor=sweep.reduction_factor,
        )
        if sweep.stops_trials_early
        else FIFOScheduler()
    )
    searcher = ResumableOptunaSearch(
        space=SearchSpace.from_config(cfg),
        metric=sweep.metric,
        mode="max",
        points_to_evaluate=default_points(cfg),
        sampler=optuna.samplers.TPESampler(seed=sweep.seed),
        storage=optuna.storages.RDBStorage(optuna_storage(sweep_dir)),
        study_name=name,
    )
    return tune.TuneConfig(
        metric=sweep.metric,
        mode="max",
        search_alg=searcher,
        scheduler=scheduler,
        num_samples=sweep.trials,
        max_concurrent_trials=concurrency,
        reuse_actors=True,
    )


def optuna_storage(sweep_dir: Path) -> str:
    """The Optuna study's database: in the sweep folder, so --resume and the plots find it."""
    return f"sqlite:///{(sweep_dir / 'optuna.db').resolve()}"


def fail_orphaned_study_trials(sweep_dir: Path, name: str) -> None:
    """Once every Tune trial has ended, an Optuna trial still RUNNING was asked for by a
    sweep killed before it saved its state; mark it FAIL so the study tells no such tale."""
    study = optuna.load_study(study_name=name, storage=optuna_storage(sweep_dir))
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)


def _param_space(cfg: Config) -> dict[str, Any]:
    if cfg.sweep.mode == "fair":
        return {
            "encoder": tune.grid_search(list(cfg.sweep.encoders)),
            "seed": tune.grid_search(list(range(cfg.sweep.seeds))),
        }
    return {}


class ProgressLog(tune.Callback):
    """The live view instead of Tune's tables: one short line per trial event, with the
    elapsed time, and a status line (counts, best so far) whenever a trial ends. With 20
    trials it stays a readable log rather than a table redrawn every few seconds."""

    def __init__(self, total: int, epochs: int, metric: str, log=print) -> None:
        self.total = total
        self.epochs = epochs
        self.metric = metric
        self.log = log
        self.started = time.monotonic()
        self.best: tuple[float, str] | None = None
        self.failed = 0

    def setup(self, **info) -> None:
        """Called when Tune starts, and again when a resumed sweep restores this callback."""
        self.started = time.monotonic()

    def _line(self, text: str) -> None:
        minutes, seconds = divmod(int(time.monotonic() - self.started), 60)
        self.log(f"[{minutes:3d}:{seconds:02d}] {text}")

    @staticmethod
    def _describe(config: dict[str, Any]) -> str:
        parts = [str(config.get("encoder", "?"))]
        if "batch_size" in config:
            parts.append(f"bs={config['batch_size']}")
        if "lr" in config:
            parts.append(f"lr={config['lr']:.1e}")
        if "seed" in config:
            parts.append(f"seed={config['seed']}")
        parts += [f"{key}={config[key]}" for key in ("loss_kind", "class_weights") if key in config]
        return " ".join(parts)

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._line(f"start  {trial.trial_id}  {self._describe(trial.config)}")

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        score = result.get(self.metric, float("nan"))
        if math.isfinite(score) and (self.best is None or score > self.best[0]):
            self.best = (score, f"{trial.trial_id} ({trial.config.get('encoder', '?')})")
        epoch = int(result.get("epoch", 0))
        self._line(f"epoch  {trial.trial_id}  {epoch}/{self.epochs}  {self.metric} {score:.4f}")

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._line(f"end    {trial.trial_id}")
        self._status(trials, trial)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.failed += 1
        self._line(f"FAILED {trial.trial_id}  {self._describe(trial.config)} (reason in the summary below)")
        self._status(trials, trial)

    def _status(self, trials, ended) -> None:
        """Counts after ``ended`` ends (Tune calls back before it updates the trial's status)."""
        done = sum(t is ended or t.status in ("TERMINATED", "ERROR") for t in trials)
        running = sum(t is not ended and t.status == "RUNNING" for t in trials)
        failed = f" ({self.failed} failed)" if self.failed else ""
        best = f"; best {self.best[0]:.4f} by {self.best[1]}" if self.best else ""
        pending = max(self.total - done - running, 0)
        self.log(f"{'':9}trials: {done}/{self.total} done{failed}, {running} running, {pending} to come{best}")


def run_sweep(
    cfg: Config, cache: Path, sweep_dir: Path, name: str, sweep: SweepRun | None, resume: bool, verbose: bool = False
) -> tune.ResultGrid:
    """Start (or resume) the sweep's Tuner on the connected Ray cluster and wait for it."""
    concurrency = max_concurrent_trials(cfg, ray.cluster_resources())
    # By default Tune saves the sweep's state every 10 s or more; a trial that ends
    # inside that window is re-run after a kill and --resume. Saving each second keeps it short.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", str(STATE_SAVE_PERIOD_S))
    if not verbose:  # Optuna announces every study and trial at INFO
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    tune.register_trainable(TRIAL_NAME, _trainable(cfg, cache, sweep_dir, sweep))
    tune_path = sweep_dir / TUNE_FOLDER
    if resume:
        tuner = tune.Tuner.restore(str(tune_path), TRIAL_NAME, resume_unfinished=True, resume_errored=False)
    else:
        tuner = tune.Tuner(
            TRIAL_NAME,
            param_space=_param_space(cfg),
            tune_config=_tune_config(cfg, sweep_dir, name, concurrency),
            run_config=tune.RunConfig(
                name=TUNE_FOLDER,
                storage_path=str(sweep_dir.resolve()),
                verbose=2 if verbose else 0,
                callbacks=[] if verbose else [ProgressLog(trial_count(cfg), cfg.train.epochs, cfg.sweep.metric)],
                # One-worker trials are retried by Tune from their last checkpoint; DDP trials by Train.
                failure_config=tune.FailureConfig(max_failures=cfg.train.max_failures if in_process(cfg) else 0),
                checkpoint_config=tune.CheckpointConfig(
                    num_to_keep=CHECKPOINTS_KEPT,
                    checkpoint_score_attribute=cfg.sweep.metric,
                    checkpoint_score_order="max",
                ),
            ),
        )
    return tuner.fit()


def can_resume(sweep_dir: Path) -> bool:
    return tune.Tuner.can_restore(str((sweep_dir / TUNE_FOLDER).resolve()))


@dataclass
class TrialSummary:
    """One trial's outcome and its best epoch, for the leaderboard and MLflow."""

    trial_id: str
    params: dict[str, Any]
    outcome: str
    epochs: int
    reason: str | None = None
    best: dict[str, float] = field(default_factory=dict)
    best_checkpoint: str | None = None
    unlogged_epochs: list[int] = field(default_factory=list)
    """Epochs the trial reported to Tune that its MLflow run lacks (the store was away)."""


_TRIAL_ID = re.compile(r"_([0-9a-f]{5,}(?:_[0-9]{5})?)_")


def summarise(
    results: tune.ResultGrid, histories: dict[str, list[dict[str, float]]], cfg: Config
) -> list[TrialSummary]:
    """Outcomes from Tune; epoch histories from the tracking store, which, unlike Tune's
    per-session results, stays complete when a trial is restarted or a sweep resumed.
    Params hold the batch size and learning rate the trial trained at (``encoder_max_batch``)."""
    epochs, metric = cfg.train.epochs, cfg.sweep.metric
    summaries = []
    for result in results:
        trial_id = (result.metrics or {}).get("trial_id") or _trial_id_from_path(result.path)
        rows = histories.get(trial_id, [])
        logged = {int(row["epoch"]) for row in rows if "epoch" in row}
        ran = max(int((result.metrics or {}).get("epoch", 0)), *logged, 0)
        best = max(rows, key=lambda row: row.get(metric, -math.inf), default={})
        if result.error is not None:
            outcome, reason = "failed", _root_cause(result.error)
        else:
            outcome, reason = ("completed" if ran >= epochs else "stopped_early"), None
        best_metrics = {k: v for k, v in best.items() if "/" in k}
        speeds = [row["perf/img_per_s"] for row in rows if "perf/img_per_s" in row]
        if speeds:
            best_metrics["perf/img_per_s"] = sum(speeds) / len(speeds)
            best_metrics["perf/peak_mem_mb"] = max(row["perf/peak_mem_mb"] for row in rows)
        if rows and best:
            best_metrics.update(_training_time(rows, int(best["epoch"])))
        config = result.config or {}
        params = {k: v for k, v in config.items() if not k.startswith("w_")}
        raw_weights = {k.removeprefix("w_"): v for k, v in config.items() if k.startswith("w_")}
        params.update({f"loss_weight_{h}": round(w, 4) for h, w in simplex_weights(raw_weights).items()})
        if "encoder" in params:
            params["batch_size"], params["lr"] = cfg.sweep.scaled_batch(
                params["encoder"], params.get("batch_size", cfg.train.batch_size), params.get("lr", cfg.train.lr)
            )
        checkpoint = _best_checkpoint(result, metric)
        unlogged = sorted(set(range(1, ran + 1)) - logged)
        summaries.append(TrialSummary(trial_id, params, outcome, ran, reason, best_metrics, checkpoint, unlogged))
    return sorted(summaries, key=lambda s: s.trial_id)


def _training_time(rows: list[dict[str, float]], best_epoch: int) -> dict[str, float]:
    """Seconds the trial's epochs took (training and validation), in all and up to its best epoch."""
    seconds = {int(row["epoch"]): row["perf/epoch_s"] for row in rows if "perf/epoch_s" in row and "epoch" in row}
    return {
        "perf/train_s": sum(seconds.values()),
        "perf/to_best_s": sum(value for epoch, value in seconds.items() if epoch <= best_epoch),
    }


def _best_checkpoint(result: tune.Result, metric: str) -> str | None:
    """A one-worker trial's checkpoints are Tune's own. For a DDP trial, Tune's copy of the
    reports carries each Train checkpoint's path (absent for epochs that a resumed trial
    did not re-run; ``trial.run_trial`` tags those trials itself)."""
    if result.best_checkpoints:
        return result.get_best_checkpoint(metric, "max").path
    frame = result.metrics_dataframe
    if frame is None or CHECKPOINT_PATH_KEY not in frame or metric not in frame or not frame[metric].notna().any():
        return None
    path = frame.loc[frame[metric].idxmax(), CHECKPOINT_PATH_KEY]
    return path if isinstance(path, str) else None


def _trial_id_from_path(path: str) -> str:
    match = _TRIAL_ID.search(Path(path).name)
    return match.group(1) if match else Path(path).name


def _root_cause(error: BaseException) -> str:
    """The innermost message of a Tune/Train error chain, on one line: ``Type: message``."""
    cause: BaseException = error
    while True:
        # A RayTaskError carries the trial's own exception in ``cause``, not ``__cause__``.
        inner = cause.__cause__ or getattr(cause, "cause", None)
        if not isinstance(inner, BaseException) or inner is cause:
            break
        cause = inner
    lines = [line for line in str(cause).strip().splitlines() if line.strip()]
    message = lines[-1] if lines else type(cause).__name__
    return message if type(cause).__name__ in message else f"{type(cause).__name__}: {message}"
