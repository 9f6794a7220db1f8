"""Where an epoch's wall time goes, phase by phase: the loop and the trial's reporter add
their phases to one ``EpochClock``, so the benchmark (and MLflow's ``perf/*_s`` metrics)
can tell training steps from loader waits, validation, checkpoints and logging."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class EpochClock:
    """Seconds per named phase of the current epoch (a phase may run several times), and
    those of the epochs before it, one dict each, in ``epochs``."""

    def __init__(self) -> None:
        self._seconds: dict[str, float] = {}
        self.epochs: list[dict[str, float]] = []

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - started)

    def add(self, name: str, seconds: float) -> None:
        self._seconds[name] = self._seconds.get(name, 0.0) + seconds

    def seconds(self, name: str) -> float:
        return self._seconds.get(name, 0.0)

    def lap(self) -> None:
        """The epoch is over: its phases go to ``epochs``, and the next epoch starts from zero."""
        self.epochs.append(self._seconds)
        self._seconds = {}


def training_seconds(epoch: dict[str, float]) -> float:
    """An epoch's training steps and their loader waits: the epoch less its validation,
    checkpoint and report."""
    return epoch["epoch"] - sum(epoch.get(phase, 0.0) for phase in ("validation", "checkpoint", "report"))
