"""The sweep's MLflow record against a real store: a resumed sweep accounts for every child run."""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient

from artefact.tracking import (
    OUTCOME_TAG,
    REASON_TAG,
    TrialRun,
    close_open_trials,
    close_replaced_trials,
    close_trial,
    open_sweep,
    trial_histories,
)


def test_a_trial_the_resumed_sweep_does_not_hold_is_marked_replaced_and_keeps_its_epochs(tmp_path: Path) -> None:
    """Killed in the second after a trial started but before Tune saved its state, a sweep
    resumes without that trial and runs another in its place: the orphan's run must not pass
    for an unfinished trial, nor be deleted."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweep = open_sweep(uri, "killed", {})
    for trial_id in ("kept-1", "kept-2", "orphan"):
        TrialRun(sweep, trial_id, {"lr": 1e-3}).log_epoch({"epoch": 1, "val/miou_fine": 0.2}, step=1)
    close_open_trials(sweep)  # the killed sweep's finally-block
    sweep = open_sweep(uri, "killed", {})  # --resume
    TrialRun(sweep, "kept-3", {"lr": 2e-3}).log_epoch({"epoch": 1, "val/miou_fine": 0.3}, step=1)
    kept = {"kept-1", "kept-2", "kept-3"}
    for trial_id in sorted(kept):
        close_trial(sweep, trial_id, "completed", None, None)

    histories = trial_histories(sweep)
    assert close_replaced_trials(sweep, histories, kept) == ["orphan"]

    client = MlflowClient(uri)
    trials = client.search_runs([sweep.experiment_id], "tags.`artefact.role` = 'trial'")
    runs = {r.data.tags["artefact.trial_id"]: r for r in trials}
    orphan = runs.pop("orphan")
    assert orphan.info.status == "KILLED" and orphan.data.tags[OUTCOME_TAG] == "replaced"
    assert "--resume" in orphan.data.tags[REASON_TAG]
    assert [p.value for p in client.get_metric_history(orphan.info.run_id, "val/miou_fine")] == [0.2]
    assert {trial_id: r.data.tags[OUTCOME_TAG] for trial_id, r in runs.items()} == dict.fromkeys(kept, "completed")
    assert all(r.info.status == "FINISHED" for r in runs.values())
    assert close_replaced_trials(sweep, trial_histories(sweep), kept | {"orphan"}) == []
