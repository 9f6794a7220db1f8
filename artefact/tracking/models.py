"""The sweep's best model: logged at the sweep's end with ``mlflow.pytorch`` (and registered
where the store keeps a registry), loaded by ``python -m artefact predict``."""

from __future__ import annotations

import tempfile
from pathlib import Path

from mlflow.entities import LoggedModelStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.tracking.registry import UnsupportedModelRegistryStoreURIException

from artefact.errors import UserError
from artefact.tracking.trials import get_or_create_trial_run
from artefact.tracking.vocabulary import (
    BEST_PREFIX,
    BEST_RUN_TAG,
    MODEL_NAME,
    ROLE_TAG,
    SweepRun,
    TrainedModel,
    global_tracking_uri,
    quiet,
    registered_model_name,
)


def log_best_model(
    sweep: SweepRun, trial_id: str, model: object, files: list[Path], requirements: list[str]
) -> tuple[str, str | None]:
    """Log the sweep's best model (``mlflow.pytorch``, with ``files``) into its trial's run,
    register it as ``artefact-<sweep>`` where the store keeps a registry, then tag the parent
    run with that run, which ``best:<sweep>`` follows: last, so that the tag never names a
    run without a complete model. Returns (the run id, the registered version or None)."""
    import mlflow.pytorch

    client = MlflowClient(sweep.uri)
    run_id, _ = get_or_create_trial_run(client, sweep, trial_id)
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
