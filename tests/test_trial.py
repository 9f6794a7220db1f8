"""What a trial process loads to unpickle its function (``artefact.tune.trial``)."""

from __future__ import annotations

import subprocess
import sys

from sweep_helpers import REPO

HEAVY = ("optuna", "torch", "artefact.tune.tuner", "artefact.tune.worker")


def test_a_trial_process_finds_its_function_without_optuna_or_the_training_stack() -> None:
    """Tune imports the trial function's module in every trial process; the training stack
    is imported later, with the garbage collector paused, and Optuna never."""
    probe = f"import sys, artefact.tune.trial; print([m for m in {HEAVY!r} if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
