"""The store and the sweep's parent run: check or create a store before anything starts,
open (or reopen, on resume) a sweep's experiment and parent run, and close it."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import closing
from pathlib import Path

import mlflow.version
from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient

from artefact.config_files import absolute_sqlite
from artefact.errors import UserError
from artefact.tracking.vocabulary import (
    PARENT_TAG,
    ROLE_TAG,
    SWEEP_TAG,
    SweepRun,
    sqlite_artifact_root,
)

SOURCE_NAME_TAG = "mlflow.source.name"
SOURCE_TYPE_TAG = "mlflow.source.type"
SOURCE_GIT_COMMIT_TAG = "mlflow.source.git.commit"


def check_store(uri: str) -> None:
    """Fail before training when the store cannot be used; create a SQLite store here.

    Creating the SQLite schema in the driver, before any trial starts, avoids the
    migration race of several processes creating one store at once.
    """
    named = _store_named(uri)
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=5) as response:
                response.read()
        except (urllib.error.URLError, OSError) as error:
            raise UserError(
                f"{named}: the MLflow server does not answer ({error}); start it"
                " (see mlflow/README.md) or pass another --tracking-uri."
            ) from None
    elif uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UserError(f"{named}: cannot create {path.parent} ({error.strerror}).") from None
        if not path.exists():
            _copy_empty_store(path)
    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except Exception as error:  # MLflow raises many types for a bad URI or an unwritable store
        if getattr(error, "error_code", None) in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
            user = os.environ.get("MLFLOW_TRACKING_USERNAME")
            raise UserError(
                f"{named}: the MLflow server refused "
                + (f"user {user!r}" if user else "a request without credentials")
                + ". Set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (a SLURM job's server on several"
                " nodes: user artefact, the password in the job's mlflow-auth-<job>/password)."
            ) from None
        reason = " ".join(str(error).split())[:500]
        raise UserError(f"{named}: cannot use this MLflow store ({type(error).__name__}: {reason}).") from None


def _store_named(uri: str) -> str:
    """How an error names the store: by the flag, or by MLflow's variable when it came from there."""
    from_environment = os.environ.get("MLFLOW_TRACKING_URI")
    if from_environment and uri in (from_environment, absolute_sqlite(from_environment)):
        return f"MLFLOW_TRACKING_URI={uri}"
    return f"--tracking-uri {uri}"


def _copy_empty_store(path: Path) -> None:
    """Create a SQLite store as a copy of an empty one, migrated once per MLflow version.

    MLflow builds a new store by running its whole migration history, which every first
    sweep and every test's new store would pay; a copy skips it. Where the copy cannot be
    made, MLflow creates the store itself, as before.
    """
    try:
        template = _empty_store_template()
        descriptor, scratch = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".new", dir=path.parent)
        os.close(descriptor)
    except (OSError, subprocess.SubprocessError):  # an unwritable cache only loses the shortcut
        return
    try:
        shutil.copyfile(template, scratch)
        os.link(scratch, path)  # never over a store another process has just created
    except OSError:  # that process won, or the disk is full: MLflow opens or creates the store
        pass
    finally:
        os.unlink(scratch)


def _empty_store_template() -> Path:
    """Tables and migrations only, made by MLflow's own ``mlflow db upgrade`` on an empty
    file: the default experiment, whose artifact location depends on where a store is
    opened, is added by MLflow when it first opens each copy."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "artefact-sweeps"
    template = cache / f"mlflow-{mlflow.version.VERSION}-empty.db"
    if template.exists() and _is_migrated(template):
        return template
    cache.mkdir(parents=True, exist_ok=True)
    descriptor, scratch = tempfile.mkstemp(prefix=f"{template.name}.", suffix=".new", dir=cache)
    os.close(descriptor)
    try:
        upgrade = [sys.executable, "-m", "mlflow", "db", "upgrade", f"sqlite:///{scratch}"]
        subprocess.run(upgrade, capture_output=True, check=True, timeout=120)
        if not _is_migrated(Path(scratch)):
            raise OSError(f"`mlflow db upgrade` left {scratch} without MLflow's schema")
        os.replace(scratch, template)
    finally:
        Path(scratch).unlink(missing_ok=True)
    return template


def _is_migrated(store: Path) -> bool:
    """Whether a cached template is intact and holds MLflow's schema version."""
    try:
        with closing(sqlite3.connect(f"file:{store}?mode=ro", uri=True)) as db:
            intact = db.execute("PRAGMA quick_check").fetchone() == ("ok",)
            return intact and len(db.execute("SELECT version_num FROM alembic_version").fetchall()) == 1
    except sqlite3.Error:
        return False


def sweep_exists(uri: str, sweep: str) -> bool:
    """Whether the store already holds a sweep of this name (a new sweep must not join it)."""
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(sweep)
    if experiment is None:
        return False
    return bool(client.search_runs([experiment.experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'sweep'"))


def _artifact_location(uri: str, sweep: str) -> str | None:
    """A sweep's artifacts in a SQLite store's folder; a server chooses its own."""
    root = sqlite_artifact_root(uri)
    return (root / sweep).resolve().as_uri() if root is not None else None


def source_tags() -> dict[str, str]:
    """MLflow's own source tags, as ``mlflow.start_run`` sets them, which the UI shows as the
    run's source: the entry script and the commit of the checkout it is in (none for an
    installed package)."""
    source = Path(sys.argv[0]).resolve()
    tags = {SOURCE_NAME_TAG: str(source), SOURCE_TYPE_TAG: "LOCAL"}
    if not source.is_file():
        return tags
    try:
        found = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=source.parent, capture_output=True, text=True, check=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return tags
    return {**tags, SOURCE_GIT_COMMIT_TAG: found.stdout.strip()}


def open_sweep(uri: str, sweep: str, tags: dict[str, str]) -> SweepRun:
    """Get or create the sweep's experiment and parent run (a resumed sweep reuses both);
    ``tags`` and MLflow's source tags go on the parent run."""
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(sweep)
    if experiment is None:
        location = _artifact_location(uri, sweep)
        experiment_id = client.create_experiment(sweep, artifact_location=location)
    else:
        experiment_id = experiment.experiment_id
    parents = client.search_runs(
        [experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'sweep' and tags.`{SWEEP_TAG}` = '{sweep}'"
    )
    if parents:
        run_id = parents[0].info.run_id
        client.update_run(run_id, status="RUNNING")
    else:
        run_id = client.create_run(
            experiment_id, run_name=sweep, tags={ROLE_TAG: "sweep", SWEEP_TAG: sweep}
        ).info.run_id
    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in {**source_tags(), **tags}.items()])
    return SweepRun(uri, experiment_id, run_id, sweep)


def log_sweep_artifacts(run: SweepRun, paths: list[Path], folder: str | None = None) -> None:
    client = MlflowClient(run.uri)
    for path in paths:
        client.log_artifact(run.parent_run_id, str(path), folder)


def log_sweep_metrics(run: SweepRun, metrics: dict[str, float]) -> None:
    MlflowClient(run.uri).log_batch(
        run.parent_run_id, metrics=[Metric(key, value, int(time.time() * 1000), 0) for key, value in metrics.items()]
    )


def delete_sweep(run: SweepRun) -> None:
    """Remove a sweep that never got to run a trial: its parent run and any child runs."""
    client = MlflowClient(run.uri)
    children = client.search_runs([run.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{run.parent_run_id}'")
    for child in children:
        client.delete_run(child.info.run_id)
    client.delete_run(run.parent_run_id)


def finish_sweep(run: SweepRun, status: str = "FINISHED") -> None:
    MlflowClient(run.uri).set_terminated(run.parent_run_id, status=status)


def check_store_exists(uri: str) -> None:
    """``check_store`` for reading: a SQLite store that is not there is an error, not created."""
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise UserError(f"--tracking-uri {uri}: no MLflow store there; pass the store the sweep logged to.")
    check_store(uri)
