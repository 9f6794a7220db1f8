"""MLflow: one experiment per sweep, a parent run per sweep, a child run per trial.

This is the only module that imports mlflow. It talks through ``MlflowClient`` with
explicit run ids, so trial processes never depend on a global active run, and finds
runs by tags (never by timestamps), so a restarted trial or a resumed sweep reattaches
to its own run instead of creating a duplicate.
"""

from __future__ import annotations

import math
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
from mlflow.entities import LoggedModelStatus, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.tracking.registry import UnsupportedModelRegistryStoreURIException

from artefact.config import absolute_sqlite
from artefact.errors import UserError
from artefact.tracking_store import (
    BEST_CHECKPOINT_TAG,
    BEST_PREFIX,
    BEST_RUN_TAG,
    EVALUATION_TAG,
    FINAL_STATUS,
    MODEL_NAME,
    OUTCOME_TAG,
    PARENT_TAG,
    REASON_TAG,
    REPLACED_REASON,
    RESUME_NOTE_TAG,
    ROLE_TAG,
    STORE_PATIENCE_S,
    SWEEP_TAG,
    TRIAL_TAG,
    SweepRun,
    TrainedModel,
    global_tracking_uri,
    patiently,
    quiet,
    registered_model_name,
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


def delete_sweep(run: SweepRun) -> None:
    """Remove a sweep that never got to run a trial: its parent run and any child runs."""
    client = MlflowClient(run.uri)
    children = client.search_runs([run.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{run.parent_run_id}'")
    for child in children:
        client.delete_run(child.info.run_id)
    client.delete_run(run.parent_run_id)


def finish_sweep(run: SweepRun, status: str = "FINISHED") -> None:
    MlflowClient(run.uri).set_terminated(run.parent_run_id, status=status)


def find_trial_run(client: MlflowClient, run: SweepRun, trial_id: str) -> str | None:
    found = client.search_runs(
        [run.experiment_id],
        filter_string=f"tags.`{TRIAL_TAG}` = '{trial_id}' and tags.`{PARENT_TAG}` = '{run.parent_run_id}'",
    )
    return found[0].info.run_id if found else None


def _get_or_create_trial_run(client: MlflowClient, sweep: SweepRun, trial_id: str) -> tuple[str, bool]:
    """(run id, created): one child run per trial id, whoever asks first."""
    run_id = find_trial_run(client, sweep, trial_id)
    if run_id is not None:
        return run_id, False
    tags = {PARENT_TAG: sweep.parent_run_id, TRIAL_TAG: trial_id, SWEEP_TAG: sweep.sweep, ROLE_TAG: "trial"}
    return client.create_run(sweep.experiment_id, run_name=trial_id, tags=tags).info.run_id, True


class TrialRun:
    """A trial's child run, logged from rank 0 of the trial only.

    Epochs are logged at most once: a restarted trial re-runs the epochs after its last
    checkpoint, and an epoch this run already holds is not logged again. While the store
    cannot be reached, epochs are held in order and sent once it answers again, so a
    tracking outage never stops training (``flush``).
    """

    def __init__(self, sweep: SweepRun, trial_id: str, params: dict[str, object]) -> None:
        self.client = MlflowClient(sweep.uri)
        self.run_id, created = patiently(
            lambda: _get_or_create_trial_run(self.client, sweep, trial_id), STORE_PATIENCE_S
        )
        self.logged_epochs: set[int] = set()
        self.held: list[tuple[str, list[Metric]]] = []
        self.earlier_failure: str | None = None
        """Why an earlier attempt of this trial failed in a way a restart would repeat."""
        if created:
            patiently(
                lambda: self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in params.items()]),
                STORE_PATIENCE_S,
            )
        else:
            self.earlier_failure, self.logged_epochs = patiently(self._reattach, STORE_PATIENCE_S)

    def _reattach(self) -> tuple[str | None, set[int]]:
        """A restarted trial's run, running again: (its recorded failure, the epochs it holds)."""
        run = self.client.get_run(self.run_id)
        self.client.update_run(self.run_id, status="RUNNING")
        return run.data.tags.get(REASON_TAG), {p.step for p in self.client.get_metric_history(self.run_id, "epoch")}

    def log_epoch(self, metrics: dict[str, float], step: int) -> None:
        """One batch per epoch (``epoch`` included), so an epoch is in the store whole or not at all."""
        if step in self.logged_epochs:
            return
        now = int(time.time() * 1000)
        rows = [
            Metric(key, float(value), now, step)
            for key, value in metrics.items()
            if isinstance(value, (int, float)) and math.isfinite(value)
        ]
        self.held.append((f"epoch {step}", rows))
        self.logged_epochs.add(step)
        self.flush()

    def flush(self, patience_s: float = 0.0) -> list[str]:
        """Send the held epochs, oldest first, retrying for up to ``patience_s``; returns
        those still unsent (and says so on stderr, which Ray keeps in the worker log)."""
        try:
            patiently(self._send_held, patience_s)
        except Exception as error:
            unsent = [what for what, _ in self.held]
            print(f"MLflow store unreachable ({type(error).__name__}); holding {', '.join(unsent)}", file=sys.stderr)
        return [what for what, _ in self.held]

    def _send_held(self) -> None:
        while self.held:
            self.client.log_batch(self.run_id, metrics=self.held[0][1])
            self.held.pop(0)

    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def log_evaluation(self, folder: Path, artifact_path: str) -> None:
        """Log the best epoch's figures, then point the run's evaluation tag at them.

        Each epoch gets its own folder and the tag moves only once every file is in, so a
        trial stopped mid-upload (ASHA kills it) still points at a complete set.
        """
        self.client.log_artifacts(self.run_id, str(folder), artifact_path)
        self.client.set_tag(self.run_id, EVALUATION_TAG, artifact_path)

    def record_failure(self, reason: str) -> None:
        """Note a failure that a restart would repeat, so the restarted attempt stops at once."""
        patiently(lambda: self.client.set_tag(self.run_id, REASON_TAG, reason[:4000]), STORE_PATIENCE_S)

    def note_resume(self, note: str) -> None:
        self.client.set_tag(self.run_id, RESUME_NOTE_TAG, note[:4000])


def trial_histories(sweep: SweepRun) -> dict[str, list[dict[str, float]]]:
    """Each trial's metrics per epoch, as logged: the record that survives restarts and resumes."""
    client = MlflowClient(sweep.uri)
    runs = client.search_runs(
        [sweep.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{sweep.parent_run_id}'", max_results=10000
    )
    histories = {}
    for run in runs:
        by_step: dict[int, dict[str, float]] = {}
        for key in run.data.metrics:
            for point in client.get_metric_history(run.info.run_id, key):
                by_step.setdefault(point.step, {})[key] = point.value
        histories[run.data.tags[TRIAL_TAG]] = [by_step[step] for step in sorted(by_step)]
    return histories


def close_open_trials(sweep: SweepRun) -> None:
    """Mark trials still RUNNING (their process died, or the sweep stopped) as KILLED."""
    client = MlflowClient(sweep.uri)
    running = client.search_runs(
        [sweep.experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{sweep.parent_run_id}' and attributes.status = 'RUNNING'",
    )
    for run in running:
        client.set_terminated(run.info.run_id, status="KILLED")


def close_replaced_trials(sweep: SweepRun, logged: dict[str, object], kept: set[str]) -> list[str]:
    """Mark the trials in ``logged`` that the finished sweep does not hold (``kept``) as
    replaced: Tune's saved state predates them, so the resumed sweep ran new ones instead."""
    replaced = sorted(set(logged) - kept)
    for trial_id in replaced:
        close_trial(sweep, trial_id, "replaced", REPLACED_REASON, None)
    return replaced


def set_best_checkpoint(sweep: SweepRun, trial_id: str, path: str) -> None:
    client = MlflowClient(sweep.uri)
    run_id, _ = _get_or_create_trial_run(client, sweep, trial_id)
    client.set_tag(run_id, BEST_CHECKPOINT_TAG, path)


def close_trial(sweep: SweepRun, trial_id: str, outcome: str, reason: str | None, best_checkpoint: str | None) -> None:
    """Record how a trial ended; creates the run if the trial died before logging anything."""
    client = MlflowClient(sweep.uri)
    run_id, _ = _get_or_create_trial_run(client, sweep, trial_id)
    tags = [RunTag(OUTCOME_TAG, outcome)]
    if reason:
        tags.append(RunTag(REASON_TAG, reason[:4000]))
    if best_checkpoint:
        tags.append(RunTag(BEST_CHECKPOINT_TAG, best_checkpoint))
    client.log_batch(run_id, tags=tags)
    client.set_terminated(run_id, status=FINAL_STATUS[outcome])


# The sweep's best model: logged at the sweep's end, loaded by ``python -m artefact predict``.


def trial_text(sweep: SweepRun, trial_id: str, name: str) -> str | None:
    """A text file a trial's run holds (its resolved ``config.yaml``); None when it has none."""
    client = MlflowClient(sweep.uri)
    run_id = find_trial_run(client, sweep, trial_id)
    if run_id is None or name not in {entry.path for entry in client.list_artifacts(run_id)}:
        return None
    with tempfile.TemporaryDirectory(prefix="artefact-artifact-") as folder:
        return Path(client.download_artifacts(run_id, name, folder)).read_text(encoding="utf-8")


def log_best_model(
    sweep: SweepRun, trial_id: str, model: object, files: list[Path], requirements: list[str]
) -> tuple[str, str | None]:
    """Log the sweep's best model (``mlflow.pytorch``, with ``files``) into its trial's run,
    register it as ``artefact-<sweep>`` where the store keeps a registry, then tag the parent
    run with that run, which ``best:<sweep>`` follows: last, so that the tag never names a
    run without a complete model. Returns (the run id, the registered version or None)."""
    import mlflow.pytorch

    client = MlflowClient(sweep.uri)
    run_id, _ = _get_or_create_trial_run(client, sweep, trial_id)
    # In the sweep's experiment: MLflow would put a model logged by run id alone in the default one.
    logged = client.create_logged_model(sweep.experiment_id, name=MODEL_NAME, source_run_id=run_id)
    # Model.log and the SQL registry look the logged model up in MLflow's global store.
    with global_tracking_uri(sweep.uri), quiet("mlflow.pytorch"):
        mlflow.pytorch.log_model(
            model,
            name=MODEL_NAME,
            model_id=logged.model_id,
            run_id=run_id,
            # Pickled: pt2 (MLflow's default) needs an input example and fixes the input size.
            serialization_format="pickle",
            pip_requirements=requirements,
            extra_files=[str(path) for path in files],
        )
        version = _register(client, registered_model_name(sweep.sweep), logged.model_id, run_id)
    client.set_tag(sweep.parent_run_id, BEST_RUN_TAG, run_id)
    return run_id, version


def _register(client: MlflowClient, name: str, model_id: str, run_id: str) -> str | None:
    """A new version of the registered model ``name``; None where the store has no registry."""
    try:
        client.search_registered_models(max_results=1)
    except UnsupportedModelRegistryStoreURIException:
        return None
    try:
        client.create_registered_model(name)
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    return client.create_model_version(name, f"models:/{model_id}", run_id=run_id, model_id=model_id).version


def load_logged_model(uri: str, run: str, map_location: str) -> TrainedModel:
    """The model logged in ``run`` (a run id, or ``best:<sweep>``), loaded onto ``map_location``."""
    import mlflow.pytorch

    client = MlflowClient(uri)
    run_id = _model_run(client, uri, run)
    experiment_id = client.get_run(run_id).info.experiment_id
    models = [
        model
        for model in client.search_logged_models(
            [experiment_id], filter_string=f"source_run_id = '{run_id}' AND name = '{MODEL_NAME}'"
        )
        if model.status == LoggedModelStatus.READY
    ]
    if not models:
        raise UserError(
            f"--run {run}: run {run_id} has no logged model. A sweep logs one, in its best trial's run;"
            " pass best:<sweep> or that run's id."
        )
    model_id = max(models, key=lambda model: model.creation_timestamp).model_id
    with tempfile.TemporaryDirectory(prefix="artefact-model-") as folder, global_tracking_uri(uri):
        path = Path(mlflow.artifacts.download_artifacts(f"models:/{model_id}", dst_path=folder))
        try:
            model = mlflow.pytorch.load_model(str(path), map_location=map_location)
        except Exception as error:  # unpickling runs this code's classes: any error of theirs
            raise UserError(
                f"--run {run}: cannot load its model ({type(error).__name__}: {error}); was it logged by"
                " another version of this code?"
            ) from None
        files = {file.name: file.read_text(encoding="utf-8") for file in (path / "extra_files").glob("*")}
    return TrainedModel(run_id, model, files)


def check_store_exists(uri: str) -> None:
    """``check_store`` for reading: a SQLite store that is not there is an error, not created."""
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise UserError(f"--tracking-uri {uri}: no MLflow store there; pass the store the sweep logged to.")
    check_store(uri)


def _model_run(client: MlflowClient, uri: str, run: str) -> str:
    """The run id ``run`` names: itself, or for ``best:<sweep>`` the run the sweep's parent tags."""
    if not run.startswith(BEST_PREFIX):
        try:
            return client.get_run(run).info.run_id
        except MlflowException:
            raise UserError(
                f"--run {run}: the store {uri} has no such run; pass a trial's run id or best:<sweep>."
            ) from None
    sweep = run.removeprefix(BEST_PREFIX)
    experiment = client.get_experiment_by_name(sweep)
    parents = (
        client.search_runs([experiment.experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'sweep'")
        if experiment is not None
        else []
    )
    if not parents:
        raise UserError(f"--run {run}: the store {uri} has no sweep named {sweep!r}.")
    best = parents[0].data.tags.get(BEST_RUN_TAG)
    if best is None:
        raise UserError(
            f"--run {run}: sweep {sweep!r} has no logged model; a sweep logs its best trial's model when it"
            " finishes with at least one scored trial."
        )
    return best
