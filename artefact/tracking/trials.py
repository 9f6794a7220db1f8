"""A trial's child run: created once per trial id, reattached after restarts, closed with
its outcome; and the per-epoch histories the sweep's summary reads back."""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from artefact.tracking.vocabulary import (
    BEST_CHECKPOINT_TAG,
    EVALUATION_TAG,
    FINAL_STATUS,
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
    patiently,
)


def find_trial_run(client: MlflowClient, run: SweepRun, trial_id: str) -> str | None:
    found = client.search_runs(
        [run.experiment_id],
        filter_string=f"tags.`{TRIAL_TAG}` = '{trial_id}' and tags.`{PARENT_TAG}` = '{run.parent_run_id}'",
    )
    return found[0].info.run_id if found else None


def get_or_create_trial_run(client: MlflowClient, sweep: SweepRun, trial_id: str) -> tuple[str, bool]:
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
        self.trial_id = trial_id
        self.client = MlflowClient(sweep.uri)
        self.run_id, created = patiently(
            lambda: get_or_create_trial_run(self.client, sweep, trial_id), STORE_PATIENCE_S
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

    def record_unsent(self, folder: Path) -> None:
        """Write what this run still lacks to ``folder/<trial>.json`` (``UNSENT_FOLDER``), for
        the sweep to list when the store never comes back; written whole or not at all, and
        removed once a later attempt of the trial has sent everything."""
        path = folder / f"{self.trial_id}.json"
        if not self.held:
            path.unlink(missing_ok=True)
            return
        from artefact.train.checkpoint import write_atomic  # imports torch: trial processes have it

        record = {"trial_id": self.trial_id, "run_id": self.run_id, "unsent": [what for what, _ in self.held]}
        write_atomic(path, lambda stream: stream.write(json.dumps(record).encode()), durable=False)

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


def unsent_records(folder: Path) -> list[dict]:
    """The records of ``TrialRun.record_unsent`` in ``folder``, by trial id."""
    return sorted((json.loads(path.read_text()) for path in folder.glob("*.json")), key=lambda r: r["trial_id"])


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
    run_id, _ = get_or_create_trial_run(client, sweep, trial_id)
    client.set_tag(run_id, BEST_CHECKPOINT_TAG, path)


def close_trial(sweep: SweepRun, trial_id: str, outcome: str, reason: str | None, best_checkpoint: str | None) -> None:
    """Record how a trial ended; creates the run if the trial died before logging anything."""
    client = MlflowClient(sweep.uri)
    run_id, _ = get_or_create_trial_run(client, sweep, trial_id)
    tags = [RunTag(OUTCOME_TAG, outcome)]
    if reason:
        tags.append(RunTag(REASON_TAG, reason[:4000]))
    if best_checkpoint:
        tags.append(RunTag(BEST_CHECKPOINT_TAG, best_checkpoint))
    client.log_batch(run_id, tags=tags)
    client.set_terminated(run_id, status=FINAL_STATUS[outcome])


def trial_text(sweep: SweepRun, trial_id: str, name: str) -> str | None:
    """A text file a trial's run holds (its resolved ``config.yaml``); None when it has none."""
    client = MlflowClient(sweep.uri)
    run_id = find_trial_run(client, sweep, trial_id)
    if run_id is None or name not in {entry.path for entry in client.list_artifacts(run_id)}:
        return None
    with tempfile.TemporaryDirectory(prefix="artefact-artifact-") as folder:
        return Path(client.download_artifacts(run_id, name, folder)).read_text(encoding="utf-8")
