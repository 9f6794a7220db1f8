"""The sweep's MLflow record against a real store: a resumed sweep accounts for every child run."""

from __future__ import annotations

import sqlite3
import sys
from contextlib import closing
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from artefact.tracking.store import check_store, open_sweep
from artefact.tracking.trials import TrialRun, close_replaced_trials, close_trial, trial_histories
from artefact.tracking.vocabulary import OUTCOME_TAG, REASON_TAG


def test_a_trial_the_resumed_sweep_does_not_hold_is_marked_replaced_and_keeps_its_epochs(tmp_path: Path) -> None:
    """Killed in the second after a trial started but before Tune saved its state, a sweep
    resumes without that trial and runs another in its place: the orphan's run must not pass
    for an unfinished trial, nor be deleted."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweep = open_sweep(uri, "killed", {})
    for trial_id in ("kept-1", "kept-2", "orphan"):
        TrialRun(sweep, trial_id, {"lr": 1e-3}).log_epoch({"epoch": 1, "val/miou_fine": 0.2}, step=1)
    # SIGKILLed, the sweep ran no finally-block: the orphan's run is still RUNNING
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


def _schema(store: Path) -> list[tuple]:
    """Each table and index with its definition's lines sorted (Alembic writes a recreated
    table's constraints in set order, which varies from process to process), then the
    schema version."""
    with closing(sqlite3.connect(store)) as db:
        tables = db.execute("SELECT type, name, sql FROM sqlite_master ORDER BY type, name").fetchall()
        version = db.execute("SELECT version_num FROM alembic_version").fetchall()
    lines = [(kind, name, sorted(line.strip(" ,") for line in (sql or "").splitlines())) for kind, name, sql in tables]
    return [*lines, *version]


def test_a_new_store_is_copied_from_a_migrated_template_and_matches_one_mlflow_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MLflow migrates every new SQLite store from scratch (seconds per sweep and per test);
    a copy of an empty store migrated once per MLflow version must be the same store."""
    monkeypatch.chdir(tmp_path)  # MLflow's default experiment is placed relative to here
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    check_store(f"sqlite:///{tmp_path / 'first.db'}")
    [template] = (tmp_path / "cache" / "artefact-sweeps").glob("mlflow-*-empty.db")
    with closing(sqlite3.connect(template)) as db:
        db.execute("PRAGMA user_version = 7")  # a mark that only a copy of the template carries
    copied = tmp_path / "copied.db"
    check_store(f"sqlite:///{copied}")
    with closing(sqlite3.connect(copied)) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (7,)

    monkeypatch.setenv("XDG_CACHE_HOME", str(template))  # a file: no cache, so MLflow makes the store
    made = tmp_path / "made.db"
    check_store(f"sqlite:///{made}")
    assert _schema(copied) == _schema(made) == _schema(tmp_path / "first.db")
    experiments = [
        [(e.experiment_id, e.name, e.artifact_location) for e in MlflowClient(f"sqlite:///{db}").search_experiments()]
        for db in (copied, made)
    ]
    assert experiments[0] == experiments[1] == [("0", "Default", str(tmp_path / "mlruns" / "0"))]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "copied.db", "first.db", "made.db"]

    sweep = open_sweep(f"sqlite:///{copied}", "copied", {})
    TrialRun(sweep, "t1", {"lr": 1e-3}).log_epoch({"epoch": 1, "val/miou_fine": 0.5}, step=1)
    assert trial_histories(sweep) == {"t1": [{"epoch": 1.0, "val/miou_fine": 0.5}]}
    check_store(f"sqlite:///{copied}")  # an existing store is opened, never replaced
    assert list(trial_histories(sweep)) == ["t1"]


def test_a_damaged_template_is_rebuilt_and_the_store_still_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    check_store(f"sqlite:///{tmp_path / 'first.db'}")
    [template] = (tmp_path / "cache" / "artefact-sweeps").glob("mlflow-*-empty.db")
    template.write_bytes(b"SQLite format 3\x00" + bytes(4000))  # a header, then nothing usable

    check_store(f"sqlite:///{tmp_path / 'second.db'}")
    assert _schema(tmp_path / "second.db") == _schema(tmp_path / "first.db")
    assert _schema(template)[-1] == _schema(tmp_path / "first.db")[-1]  # rebuilt: the schema version is back
    assert sorted(p.name for p in template.parent.iterdir()) == [template.name]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "first.db", "second.db"]


def test_a_template_mlflow_cannot_make_only_costs_the_shortcut(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The template is made by ``mlflow db upgrade``, MLflow's public command: where it fails,
    MLflow makes the store itself."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-python"))
    check_store(f"sqlite:///{tmp_path / 'made.db'}")
    assert MlflowClient(f"sqlite:///{tmp_path / 'made.db'}").get_experiment("0").name == "Default"
    assert list((tmp_path / "cache" / "artefact-sweeps").iterdir()) == []  # no template, no scratch file left
