"""The sweep's live view instead of Tune's tables: one short line per trial event."""

from __future__ import annotations

import math
import time
from typing import Any

from ray import tune


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
        parts += [f"{key}={config[key]}" for key in ("seed", "fold") if key in config]
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
