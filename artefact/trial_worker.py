"""What runs a trial's training loop and reports it: to Ray Train on each worker of a
DDP trial, or to Ray Tune directly for a one-worker trial; on rank 0 also to the trial's
MLflow child run."""

from __future__ import annotations

import csv
import io
import math
import shutil
import sys
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

from artefact.checkpoint import CHECKPOINT_FILE, copy_atomic, load_checkpoint
from artefact.config import Config, dump_yaml, from_dict
from artefact.errors import UserError
from artefact.figures import Evaluation, evaluation_figures
from artefact.loop import TrialFailure, class_weight_table, train
from artefact.models import TRAINING_FLOP_FACTOR, resolve_encoder
from artefact.tracking import STORE_PATIENCE_S, SweepRun, TrialRun, unless_store_is_away
from artefact.weights import weights_source

EVALUATION_FOLDER = "evaluation"
CLASS_WEIGHTS_FILE = "class_weights.csv"


def trial_params(cfg: Config) -> dict[str, object]:
    """The child run's params: what distinguishes one trial from another, and what its
    encoder started from (``weights_source``: a hub commit, a file's sha256, or none)."""
    weights = cfg.loss.weights(cfg.model.heads)
    return {
        "encoder": cfg.model.encoder,
        "weights_source": weights_source(cfg.model.pretrained, resolve_encoder(cfg.model.encoder)),
        "arch": cfg.model.arch,
        "heads": ",".join(cfg.model.heads),
        "batch_size": cfg.train.batch_size,
        "lr": cfg.train.lr,
        "resolution": cfg.data.resolution,
        "amp": cfg.train.amp,
        "seed": cfg.train.seed,
        "epochs": cfg.train.epochs,
        "workers": cfg.resources.workers_per_trial,
        "loss_kind": cfg.loss.kind,
        "class_weights": cfg.loss.class_weights,
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
the last epoch and, best effort, when the trial ends otherwise.

Drawing and uploading them takes 1-3 s of CPU; on short CPU epochs, drawing at every
improving epoch cost a quarter of the training time (sweeps/perf_bench.py). Where ASHA may
stop the trial, they are drawn at the first epoch too: a stopped trial may end before its
best-effort drawing runs, and would then have no figures at all (a CI run caught that).
Elsewhere the interval counts from the trial's start."""


class RayReporter:
    """Forwards each epoch to Ray (metrics + checkpoint) and, on rank 0, to MLflow:
    metrics per epoch, the resolved config, model summary and (given the cache) class-weights
    table once, and the best epoch's figures, at most every ``FIGURE_INTERVAL_S`` and at the end."""

    def __init__(self, run: TrialRun | None, cfg: Config, send: Send, cache: Path | None = None) -> None:
        self.run = run
        self.cfg = cfg
        self.send = send
        self.cache = cache
        self.described = False
        self.pending: Evaluation | None = None
        self.drawn_at = -math.inf if cfg.sweep.stops_trials_early else time.monotonic()
        self.last_metrics: dict[str, float] = {}

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None, evaluation: Evaluation | None) -> None:
        self.last_metrics = metrics
        # MLflow goes first: Tune may stop the trial inside the report (ASHA, or its last
        # epoch), and nothing after it would run. A retried epoch is not logged twice
        # (``TrialRun.log_epoch``).
        if self.run is not None:
            self.pending = evaluation or self.pending
            last_epoch = int(metrics["epoch"]) >= self.cfg.train.epochs
            if not self.described:
                self.described = unless_store_is_away(self.describe)
            if last_epoch or time.monotonic() - self.drawn_at >= FIGURE_INTERVAL_S:
                unless_store_is_away(self.draw_figures)
            self.run.log_epoch(metrics, step=int(metrics["epoch"]))
        self.send(metrics, checkpoint_dir)

    def describe(self) -> None:
        """The resolved config, the model summary and the loss's class weights, logged once."""
        self.run.log_text(dump_yaml(self.cfg), "config.yaml")
        self.run.log_text(model_summary(self.cfg, self.last_metrics), "model_summary.yaml")
        if self.cache is not None:
            self.run.log_text(_csv(class_weight_table(self.cfg, self.cache)), CLASS_WEIGHTS_FILE)

    def draw_figures(self) -> None:
        """Log the best epoch's figures not yet logged, if any (kept for later if the store is away)."""
        if self.run is None or self.pending is None:
            return
        with tempfile.TemporaryDirectory(prefix="artefact-figures-") as folder:
            evaluation_figures(self.pending, Path(folder))
            self.run.log_evaluation(Path(folder), f"{EVALUATION_FOLDER}/epoch_{self.pending.epoch:03d}")
        self.pending = None
        self.drawn_at = time.monotonic()

    def close(self) -> None:
        """At the trial's end, however it ends: the last figures, then every held epoch."""
        if self.run is None:
            return
        unless_store_is_away(self.draw_figures)
        unsent = self.run.flush(STORE_PATIENCE_S)
        if unsent:
            print(f"MLflow run {self.run.run_id} lacks {', '.join(unsent)}: the store never came back", file=sys.stderr)


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


def _csv(rows: list[dict[str, object]]) -> str:
    """Rows as CSV text: the MLflow UI shows a .csv artifact as a table, and a restarted trial
    replaces it (``log_table`` would append a second copy)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def train_worker(loop_config: dict[str, Any]) -> None:
    """The per-worker entry point of a DDP trial's TorchTrainer."""
    cfg = from_dict(loop_config["config"])
    run = None
    if ray.train.get_context().get_world_rank() == 0 and loop_config.get("sweep") is not None:
        run = TrialRun(loop_config["sweep"], loop_config["trial_id"], trial_params(cfg))
    cache = Path(loop_config["cache"])
    _train_and_report(cfg, cache, RayReporter(run, cfg, send_to_train, cache), ray.train.get_checkpoint())


def train_in_trial(cfg: Config, cache: Path, trial_id: str, sweep: SweepRun | None) -> None:
    """A one-worker trial, trained in the Tune trial's own process.

    Tune reuses that process for the next trial, so the torch stack is imported once per
    process instead of once per trial, and no Train controller or worker actors start:
    on 2 cores that saved most of the ~35 s each trial spent starting (see README,
    Performance). Tune restarts a failed trial from its last checkpoint, as Train would.
    """
    run = TrialRun(sweep, trial_id, trial_params(cfg)) if sweep is not None else None
    try:
        _train_and_report(cfg, cache, RayReporter(run, cfg, send_to_tune, cache), tune.get_checkpoint())
    finally:
        if torch.cuda.is_available():  # the next trial in this process gets the memory back
            torch.cuda.empty_cache()


def _train_and_report(cfg: Config, cache: Path, reporter: RayReporter, checkpoint: ray.train.Checkpoint | None) -> None:
    """Train from the last good checkpoint; a failure that a restart would repeat (NaN loss,
    out of memory) is recorded, and a restarted attempt of that trial fails at once."""
    run = reporter.run
    if run is not None and run.earlier_failure:
        _raise_recorded(run.earlier_failure)
    try:
        with _restored(checkpoint, run) as resume_from:
            train(cfg, cache, reporter, resume_from=resume_from)
    except TrialFailure as failure:
        if run is not None:
            run.record_failure(f"{type(failure).__name__}: {failure}")
        raise
    finally:  # also when Tune ends the trial inside a report (ASHA, or its last epoch)
        reporter.close()


def _raise_recorded(reason: str) -> None:
    name, _, message = reason.partition(": ")
    kinds = {kind.__name__: kind for kind in TrialFailure.__subclasses__()}
    raise kinds.get(name, TrialFailure)(message)


@contextmanager
def _restored(checkpoint: ray.train.Checkpoint | None, run: TrialRun | None) -> Iterator[Path | None]:
    """A local copy of the newest readable checkpoint file of a Ray checkpoint's trial, or
    None for a fresh start. A corrupt one is named (on stderr and in the MLflow run) and
    the previous one is used instead."""
    if checkpoint is None:
        yield None
        return
    folder = Path(tempfile.mkdtemp(prefix="artefact-resume-"))
    try:
        with checkpoint.as_directory() as latest:
            problems = []
            for candidate in _newest_first(Path(latest), Path(checkpoint.path)):
                try:
                    load_checkpoint(candidate)
                except UserError as error:
                    problems.append(str(error))
                    continue
                copy_atomic(candidate, folder / CHECKPOINT_FILE)
                break
            else:
                raise UserError(f"no readable checkpoint to resume this trial from: {' '.join(problems)}")
        if problems:
            note = f"{' '.join(problems)} Resumed from the previous checkpoint, {candidate}."
            print(note, file=sys.stderr)
            if run is not None:
                unless_store_is_away(lambda: run.note_resume(note))
        yield folder / CHECKPOINT_FILE
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _newest_first(latest: Path, stored: Path) -> list[Path]:
    """The latest checkpoint's file, then those of the older checkpoints kept beside it
    (Tune and Train name them ``checkpoint_<counter or time>``, which sorts by age)."""
    older = sorted((p for p in stored.parent.glob("checkpoint_*") if p.name < stored.name), reverse=True)
    return [latest / CHECKPOINT_FILE, *(p / CHECKPOINT_FILE for p in older)]
