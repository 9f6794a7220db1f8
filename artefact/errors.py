"""The error types users see, and the trial failures a restart would repeat.

Anything the user can fix (a bad config, bad data, a missing dependency) raises
``UserError``. The CLIs print its message without a traceback and exit with code 2; a
sweep stopped by a signal with its state saved exits with code 3, so that a script (the
SLURM job) can tell "resume me" from "fix me"; one whose MLflow store never came back, 4.
A message of several lines holds several problems, one a line (``Problems``), and the CLIs
print each as its own error.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class UserError(Exception):
    """A problem the user can fix; the message names the file or field and the fix. The CLIs
    print each line after ``label`` and exit with ``exit_code``."""

    exit_code = 2
    label = "error"


class SweepInterrupted(UserError):
    """A stop signal (Ctrl-C, SLURM's time-limit warning) ended the sweep; --resume continues it."""

    exit_code = 3


class TrackingLost(UserError):
    """The trials ran, but the MLflow store never came back: the message lists the runs and
    the epochs it lacks; --resume writes the report once the store answers again."""

    exit_code = 4
    label = "incomplete"


class TrialFailure(RuntimeError):
    """A failure that a restart from the last checkpoint would repeat: the trial is failed
    at once instead of being retried (see ``artefact.tune.worker``)."""


class TrainingDiverged(TrialFailure):
    """The loss became NaN or infinite; the trial stops at once instead of wasting epochs."""


class TrialOutOfMemory(TrialFailure):
    """A step ran out of GPU memory with this trial's batch size, resolution and model."""


def one_line(error: BaseException, limit: int = 300) -> str:
    """A library's exception message on one line, cut short, to quote inside a UserError."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else f"{text[:limit]}..."


class Problems:
    """Collects the problems of independent checks, so that a pre-flight reports them all
    at once, one line each, and the user fixes them in one go instead of one per run."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, message: str) -> None:
        self.lines += [line for line in message.splitlines() if line not in self.lines]

    @contextmanager
    def check(self) -> Iterator[None]:
        """Run one check; its UserError becomes a problem (a repeated line is kept once)."""
        try:
            yield
        except UserError as error:
            self.add(str(error))

    def raise_any(self) -> None:
        if self.lines:
            raise UserError("\n".join(self.lines))
