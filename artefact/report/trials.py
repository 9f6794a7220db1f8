"""The record of one finished trial that the report, the leaderboard and the best model read."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


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
