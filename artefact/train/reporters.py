"""Where each epoch of the training loop goes: a ``Reporter``. ``LocalReporter`` prints and
keeps checkpoints for a run without Ray; ``TrialReporter`` hands each epoch to Ray (through
a ``Send``) and, on rank 0, logs it to the trial's MLflow run.
"""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import yaml

from artefact.config import Config
from artefact.config_files import dump_yaml
from artefact.models import TRAINING_FLOP_FACTOR, resolve_encoder
from artefact.report.figures import Evaluation, evaluation_figures
from artefact.tracking.trials import TrialRun
from artefact.tracking.vocabulary import STORE_PATIENCE_S, unless_store_is_away
from artefact.train.checkpoint import CHECKPOINT_FILE, EpochCheckpoint, copy_atomic, save_checkpoint
from artefact.train.loop import class_weight_table
from artefact.train.timing import EpochClock
from artefact.weights import weights_source

EVALUATION_FOLDER = "evaluation"
CLASS_WEIGHTS_FILE = "class_weights.csv"


class Reporter(Protocol):
    """Receives one epoch's metrics and, on rank 0, its checkpoint (to write where it keeps
    checkpoints, if it does) and, when the epoch is the best so far, its evaluation (for
    figures)."""

    def report(
        self, metrics: dict[str, float], checkpoint: EpochCheckpoint | None, evaluation: Evaluation | None
    ) -> None: ...


class LocalReporter:
    """For runs without Ray: prints one line per epoch, keeps the latest and best checkpoints
    and draws the best epoch's figures in ``out/figures``."""

    def __init__(self, out: Path, metric: str = "val/miou_fine", log=print, resume: bool = False) -> None:
        self.out = out
        self.metric = metric
        self.log = log
        self.history: list[dict[str, float]] = []
        best_file = out / "best" / "metric.json"
        if not resume:  # a fresh run must not be compared with (or keep) an earlier run's best
            for folder in ("best", "latest", "figures"):
                shutil.rmtree(out / folder, ignore_errors=True)
        self.best = json.loads(best_file.read_text())[metric] if best_file.is_file() else -math.inf

    def report(
        self, metrics: dict[str, float], checkpoint: EpochCheckpoint | None, evaluation: Evaluation | None
    ) -> None:
        self.history.append(metrics)
        self.log(
            f"epoch {int(metrics['epoch'])}: train/loss {metrics['train/loss']:.4f}  val/loss {metrics['val/loss']:.4f}"
            f"  {self.metric} {metrics[self.metric]:.4f}  {metrics['perf/img_per_s']:.1f} img/s"
            f"  {metrics['perf/peak_mem_mb']:.0f} MB"
        )
        if evaluation is not None:
            evaluation_figures(evaluation, self.out / "figures")
        if checkpoint is None:
            return
        latest = save_checkpoint(checkpoint.state, self.out / "latest" / CHECKPOINT_FILE)
        if metrics[self.metric] > self.best:
            self.best = metrics[self.metric]
            copy_atomic(latest, self.out / "best" / CHECKPOINT_FILE)
            (self.out / "best" / "metric.json").write_text(
                json.dumps({self.metric: self.best, "epoch": metrics["epoch"]})
            )


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
        **({"cv": cfg.data.cv, "fold": cfg.data.fold} if cfg.data.fold is not None else {}),
    }


Send = Callable[[dict[str, float], EpochCheckpoint | None], None]
"""Hands one epoch's metrics and checkpoint to Ray (Train or Tune)."""


FIGURE_INTERVAL_S = 60.0
"""Least time between two drawings of a trial's best-epoch figures, which cost most of a
second of CPU each (docs/performance.md), counted from the trial's start. They are also
drawn at the last epoch, before each report at which ASHA may stop the trial (a stopped
trial may end before its best-effort drawing runs, and would then have no figures of its
best epoch), and, best effort, when the trial ends otherwise."""


def asha_rungs(cfg: Config) -> frozenset[int]:
    """The epochs before the last at whose report ASHA may stop a trial of ``cfg``: its rungs,
    grace_period x reduction_factor^k, as the sweep's ``ASHAScheduler`` places them (a test
    checks Ray's); none where nothing stops trials early."""
    if not cfg.sweep.stops_trials_early:
        return frozenset()
    rungs, rung = set(), min(cfg.sweep.grace_period, cfg.train.epochs)
    while rung < cfg.train.epochs:
        rungs.add(rung)
        rung *= cfg.sweep.reduction_factor
    return frozenset(rungs)


class TrialReporter:
    """Forwards each epoch to Ray (metrics + checkpoint) and, on rank 0, to MLflow:
    metrics per epoch, the resolved config, model summary and (given the cache) class-weights
    table once, and the best epoch's figures, at most every ``FIGURE_INTERVAL_S`` and at the end.
    Its ``clock`` times those parts (``mlflow``, ``figures``, ``send``); the loop adds its own phases
    to it when given it."""

    def __init__(self, run: TrialRun | None, cfg: Config, send: Send, cache: Path | None = None) -> None:
        self.clock = EpochClock()
        self.run = run
        self.cfg = cfg
        self.send = send
        self.cache = cache
        self.described = False
        self.pending: Evaluation | None = None
        self.drawn_at = time.monotonic()
        self.rungs = asha_rungs(cfg)
        self.last_metrics: dict[str, float] = {}

    def report(
        self, metrics: dict[str, float], checkpoint: EpochCheckpoint | None, evaluation: Evaluation | None
    ) -> None:
        self.last_metrics = metrics
        # MLflow goes first: Tune may stop the trial inside the report (ASHA, or its last
        # epoch), and nothing after it would run. A retried epoch is not logged twice
        # (``TrialRun.log_epoch``).
        if self.run is not None:
            self.pending = evaluation or self.pending
            epoch = int(metrics["epoch"])
            last_epoch = epoch >= self.cfg.train.epochs
            if not self.described:
                with self.clock.phase("mlflow"):
                    self.described = unless_store_is_away(self.describe)
            if last_epoch or epoch in self.rungs or time.monotonic() - self.drawn_at >= FIGURE_INTERVAL_S:
                with self.clock.phase("figures"):
                    unless_store_is_away(self.draw_figures)
            with self.clock.phase("mlflow"):
                self.run.log_epoch(metrics, step=epoch)
        with self.clock.phase("send"):
            self.send(metrics, checkpoint)

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
