"""A finished sweep's trials, read from Tune's results and the tracking store's histories."""

from __future__ import annotations

import math
import re
from pathlib import Path

from ray import tune
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY

from artefact.config import Config
from artefact.report.trials import TrialSummary
from artefact.tune.space import leaderboard_params

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
        if any("perf/gpu_hours" in row for row in rows):  # a running total: the trial's whole cost
            best_metrics["perf/gpu_hours"] = max(row.get("perf/gpu_hours", 0.0) for row in rows)
        if rows and best:
            best_metrics.update(_training_time(rows, int(best["epoch"])))
        params = leaderboard_params(result.config or {}, cfg)
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
    did not re-run; ``run_trial`` tags those trials itself)."""
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
        # A RayTaskError carries the trial's own exception in ``cause``, not ``__cause__``;
        # Ray Train's WorkerGroupError, each worker's in ``worker_failures`` (rank 0's first).
        failures = getattr(cause, "worker_failures", None) or {}
        inner = cause.__cause__ or getattr(cause, "cause", None) or next(iter(sorted(failures.items())), (0, None))[1]
        if not isinstance(inner, BaseException) or inner is cause:
            break
        cause = inner
    lines = [line for line in str(cause).strip().splitlines() if line.strip()]
    message = lines[-1] if lines else type(cause).__name__
    return message if type(cause).__name__ in message else f"{type(cause).__name__}: {message}"
