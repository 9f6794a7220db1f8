"""Ray Tune: the sweep's Tuner, its Optuna searcher and ASHA scheduler, and resume.

Each trial is a Tune *function* (``trial.run_trial``). Under Ray Train (every GPU profile),
it builds and fits a TorchTrainer of one or more workers named after the trial id (Train V2
style; the deprecated ``Tuner(trainer)`` is not used); its driver reserves almost no CPU, and
``max_concurrent_trials`` is derived from the cluster's resources, so trial drivers can
never hold the CPUs their workers need. An ``in_process`` trial trains in the function's own
process, which Tune reuses from trial to trial (``worker``).
"""

from __future__ import annotations

import math
import signal
import threading
from pathlib import Path

import optuna
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch
from ray.tune.trainable.function_trainable import wrap_function

from artefact.config import OBJECTIVES, Config
from artefact.errors import UserError
from artefact.tracking.vocabulary import UNSENT_FOLDER, SweepRun
from artefact.train.checkpoint import CHECKPOINTS_KEPT
from artefact.tune.progress import ProgressLog
from artefact.tune.space import SearchSpace, default_points, grid, trial_count
from artefact.tune.trial import TrialContext, in_process, run_trial

TRIAL_DRIVER_CPU = 0.01
"""A DDP trial's driver only waits on its TorchTrainer; {'cpu': 0} is refused by Ray."""
TUNE_FOLDER = "tune"
TRAIN_FOLDER = "train"
TRIAL_NAME = "_run_trial"
"""Tune's name for the trials' function (``trial.run_trial``), which also names their
folders. A sweep resumes only under the name it started with, and sweeps started before
the function moved out of this module were named after it, so the name stays."""


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


def _trainable(cfg: Config, context: TrialContext):
    """The trial function with the sweep's config and context bound: Tune puts both in Ray's
    object store once, and each trial gets them back as they are."""
    trainable = tune.with_parameters(run_trial, base=cfg, context=context)
    res = cfg.resources
    if in_process(cfg):
        return tune.with_resources(trainable, {"cpu": res.cpus_per_worker, "gpu": res.gpus_per_worker})
    return tune.with_resources(_named_after_its_trial(trainable), {"cpu": TRIAL_DRIVER_CPU})


def _named_after_its_trial(function) -> type:
    """Tune's actor for a function trial shows in the dashboard and in log prefixes as an
    anonymous ``ImplicitFunc run_trial``; Ray takes an actor's name there from its ``repr``,
    once, when the actor starts. So this one names its trial, and is never reused for
    another trial (``reuse_actors`` is off under Ray Train, whose workers start per trial anyway)."""

    class TrialDriver(wrap_function(function)):
        def __repr__(self) -> str:
            return f"trial {self.trial_id}"

    return TrialDriver


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


def asha_scheduler(cfg: Config) -> ASHAScheduler:
    """Stops a trial at its rungs (epochs grace_period x reduction_factor^k) when it is not
    among the best 1/reduction_factor there; its figures are drawn before them (``asha_rungs``)."""
    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=cfg.train.epochs,
        grace_period=min(cfg.sweep.grace_period, cfg.train.epochs),
        reduction_factor=cfg.sweep.reduction_factor,
    )


def _tune_config(cfg: Config, sweep_dir: Path, name: str, concurrency: int) -> tune.TuneConfig:
    sweep = cfg.sweep
    if sweep.mode == "fair":
        return tune.TuneConfig(
            num_samples=1, scheduler=FIFOScheduler(), max_concurrent_trials=concurrency, reuse_actors=in_process(cfg)
        )
    scheduler = asha_scheduler(cfg) if sweep.stops_trials_early else FIFOScheduler()
    # Several objectives: Optuna's multi-objective TPE gets each trial's last epoch on all of
    # them; Tune itself still ranks checkpoints by sweep.metric.
    objectives = [OBJECTIVES[name] for name in sweep.objectives]
    searcher = ResumableOptunaSearch(
        space=SearchSpace.from_config(cfg),
        metric=[key for key, _ in objectives] if objectives else sweep.metric,
        mode=[direction for _, direction in objectives] if objectives else "max",
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
        reuse_actors=in_process(cfg),
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


def run_trials(
    cfg: Config,
    cache: Path,
    sweep_dir: Path,
    name: str,
    sweep: SweepRun | None,
    resume: bool,
    concurrency: int,
    verbose: bool = False,
    folds: int = 0,
) -> tune.ResultGrid:
    """Start (or resume) the sweep's Tuner on the connected Ray cluster and wait for it,
    ``concurrency`` trials at a time (``max_concurrent_trials`` of the cluster); ``folds``:
    the cache's cross-validation folds, each a grid dimension in fair mode."""
    context = TrialContext(
        cache=cache, storage=sweep_dir / TRAIN_FOLDER, sweep=sweep, name=name, unsent=sweep_dir / UNSENT_FOLDER
    )
    tune.register_trainable(TRIAL_NAME, _trainable(cfg, context))
    tune_path = sweep_dir / TUNE_FOLDER
    if resume:
        tuner = tune.Tuner.restore(str(tune_path), TRIAL_NAME, resume_unfinished=True, resume_errored=False)
    else:
        tuner = tune.Tuner(
            TRIAL_NAME,
            param_space=grid(cfg, folds),
            tune_config=_tune_config(cfg, sweep_dir, name, concurrency),
            run_config=tune.RunConfig(
                name=TUNE_FOLDER,
                storage_path=str(sweep_dir.resolve()),
                verbose=2 if verbose else 0,
                callbacks=[StopSignals()]
                + ([] if verbose else [ProgressLog(trial_count(cfg, folds), cfg.train.epochs, cfg.sweep.metric)]),
                # One-worker trials are retried by Tune from their last checkpoint; DDP trials by Train.
                failure_config=tune.FailureConfig(max_failures=cfg.train.max_failures if in_process(cfg) else 0),
                checkpoint_config=tune.CheckpointConfig(
                    num_to_keep=CHECKPOINTS_KEPT,
                    checkpoint_score_attribute=cfg.sweep.metric,
                    checkpoint_score_order="max",
                ),
            ),
        )
    STOP_ASKED.clear()
    previous = signal.getsignal(signal.SIGTERM)
    try:
        return tuner.fit()
    finally:
        signal.signal(signal.SIGTERM, previous)


STOP_ASKED = threading.Event()
"""Set when USR1 or TERM asked the running sweep to save its state and stop."""


class StopSignals(tune.Callback):
    """Tune saves the sweep and stops on USR1, then lists a trial it stopped mid-way as
    terminated, like a finished one; this notes the request (``STOP_ASKED``) so that the sweep
    says it stopped instead of reporting it as done. TERM (``kill``, a batch script passing
    SLURM's TERM on) gets the same meaning. Tune sets its own USR1 handler before it sets up
    its callbacks, so this one wraps it."""

    def setup(self, **info) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set there; nor could Tune set its own
        tune_stops = signal.getsignal(signal.SIGUSR1)

        def stop(signum, frame) -> None:
            STOP_ASKED.set()
            if callable(tune_stops):
                tune_stops(signal.SIGUSR1, frame)

        for signum in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(signum, stop)


def can_resume(sweep_dir: Path) -> bool:
    return tune.Tuner.can_restore(str((sweep_dir / TUNE_FOLDER).resolve()))
