"""The tracking store's vocabulary and its outage policy, apart from MLflow (``tracking``
imports it): the tags that find a sweep's runs, the handle of a sweep's run that trials
carry, the store's URIs, and how a trial waits for, or works around, a store that does not
answer. Nothing here imports mlflow, so trial processes and the report can use it freely.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

SWEEP_TAG = "artefact.sweep"
ROLE_TAG = "artefact.role"
TRIAL_TAG = "artefact.trial_id"
OUTCOME_TAG = "artefact.outcome"
REASON_TAG = "artefact.failure_reason"
RESUME_NOTE_TAG = "artefact.resume_note"
BEST_CHECKPOINT_TAG = "artefact.best_checkpoint"
EVALUATION_TAG = "artefact.evaluation"
BEST_RUN_TAG = "artefact.best_run"
"""On the parent run: the run of the trial whose model the sweep logged (``best:<sweep>``)."""
MODEL_NAME = "model"
BEST_PREFIX = "best:"
PARENT_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"
FINAL_STATUS = {"completed": "FINISHED", "stopped_early": "FINISHED", "failed": "FAILED", "replaced": "KILLED"}
REPLACED_REASON = (
    "this trial started in the moments before the sweep was killed, after Tune last saved the sweep's state;"
    " --resume could not continue it and ran a new trial in its place. Its logged epochs are kept."
)

TRIAL_CLIENT_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
"""For trial processes: fail a request to an unreachable server in seconds (MLflow's own
retries wait about 4 minutes), so ``TrialRun`` holds the epoch and training goes on."""
STORE_PATIENCE_S = float(os.environ.get("ARTEFACT_STORE_PATIENCE_S", "300"))
"""How long a trial waits, at its start and at its end, and the sweep after its trials, for an
unreachable store to return (``ARTEFACT_STORE_PATIENCE_S``; Ray's workers inherit it)."""
UNSENT_FOLDER = "mlflow-unsent"
"""In a sweep's results folder: one JSON file per trial whose run was left lacking epochs
(``TrialRun.record_unsent``), for the sweep's summary when the store never comes back."""
STORE_RETRY_S = 5.0
T = TypeVar("T")


@dataclass(frozen=True)
class SweepRun:
    """What a trial needs to log into its sweep; small and picklable for Ray."""

    uri: str
    experiment_id: str
    parent_run_id: str
    sweep: str


def sqlite_artifact_root(uri: str) -> Path | None:
    """Where a SQLite store keeps artifacts: beside its database (MLflow's default is ./mlruns
    under whatever folder the process runs in). None for any other store."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///")).parent / "artifacts"


def run_page(run: SweepRun, server: str) -> str:
    """The parent run's page in an MLflow UI served at ``server``."""
    return f"{server.rstrip('/')}/#/experiments/{run.experiment_id}/runs/{run.parent_run_id}"


def registered_model_name(sweep: str) -> str:
    return f"artefact-{sweep}"


# A store outage surfaces as MLflow's own, requests' or SQLAlchemy's errors, so the two
# policies below catch Exception: wait for the store, or postpone an optional step.


def patiently(call: Callable[[], T], patience_s: float) -> T:
    """``call()``, retried every ``STORE_RETRY_S`` for up to ``patience_s`` while it fails."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            return call()
        except Exception:
            if time.monotonic() >= deadline:
                raise
            time.sleep(STORE_RETRY_S)


def unless_store_is_away(log: Callable[[], None]) -> bool:
    """Run an optional logging step; False (try again later) when the store does not answer."""
    try:
        log()
    except Exception as error:
        print(f"MLflow logging postponed ({type(error).__name__}: {error})", file=sys.stderr)
        return False
    return True


@contextmanager
def global_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's process-wide store set to ``uri`` for a while: ``log_model``, the SQL registry
    and ``models:/`` URIs read it, where everything else here names its store explicitly.
    Set through MLflow's documented variables, read at each call, so that leaving restores
    exactly what was there (``mlflow.set_tracking_uri`` cannot be undone to "not set")."""
    saved = {name: os.environ.get(name) for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    os.environ.update(dict.fromkeys(saved, uri))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def quiet(logger: str) -> Iterator[None]:
    """Hide a logger's warnings for a choice made on purpose (pickling a model we load ourselves)."""
    target = logging.getLogger(logger)
    level = target.level
    target.setLevel(logging.ERROR)
    try:
        yield
    finally:
        target.setLevel(level)


@dataclass
class TrainedModel:
    """A model loaded from a run, with the text of the files logged beside it."""

    run_id: str
    model: object
    files: dict[str, str]
