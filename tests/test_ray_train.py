"""Ray Train wraps one-worker trials (``resources.trainer=ray_train``, every GPU profile's):
a small CPU sweep under it, watched through its dashboard's API while it runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from sweep_helpers import run_bench_watching_dashboard, sweep_runs

from artefact.tune.ray_env import sweep_token_file

pytestmark = [pytest.mark.slow, pytest.mark.ray]

TRIALS, EPOCHS = 3, 2


@pytest.fixture(scope="module")
def ray_train_sweep(tmp_path_factory: pytest.TempPathFactory, synthetic_workspace: Path):
    root = tmp_path_factory.mktemp("ray-train-sweep")
    store = root / "mlflow.db"
    watched = run_bench_watching_dashboard(
        root / "results",
        synthetic_workspace,
        store,
        "wrapped",
        *("--set", "resources.trainer=ray_train", "--trials", str(TRIALS), "--epochs", str(EPOCHS)),
        watch_train=True,
    )
    assert watched.returncode == 0, watched.stderr[-3000:]
    _, children = sweep_runs(store, "wrapped")
    return watched, root / "results", store, {child.data.tags["artefact.trial_id"]: child for child in children}


def test_each_trial_is_a_train_run_named_after_it_with_its_worker(ray_train_sweep) -> None:
    watched, _, _, trials = ray_train_sweep
    assert watched.train_runs, "the dashboard's Train view never listed a run"
    runs = watched.train_runs
    assert set(runs) == {f"train-{trial_id}" for trial_id in trials}, sorted(runs)  # every trial, by its id
    for run in runs.values():
        (worker,) = run["attempts"][-1]["workers"]  # one worker: the trial's whole training loop
        assert worker["world_rank"] == 0 and worker["node_ip"] == "127.0.0.1" and worker["pid"] > 0


def test_trial_actors_carry_their_trial_ids(ray_train_sweep) -> None:
    watched, _, _, trials = ray_train_sweep
    drivers = [actor for actor in watched.actors if actor["class_name"] == "TrialDriver"]
    assert drivers and not [actor for actor in watched.actors if actor["class_name"] == "ImplicitFunc"]
    named = [re.fullmatch(r"trial (\w+)", actor["repr_name"]) for actor in drivers]
    assert all(named) and {match.group(1) for match in named} <= set(trials), [a["repr_name"] for a in drivers]


def test_the_dashboard_line_names_the_token_file_and_never_the_token(ray_train_sweep) -> None:
    watched, results, _, _ = ray_train_sweep
    token_file = sweep_token_file(results, "wrapped")
    assert f"paste the contents of {token_file})" in watched.stdout
    assert token_file.read_text().strip() not in watched.stdout + watched.stderr


def test_every_trial_logs_each_epoch_once_and_keeps_its_best_checkpoint(ray_train_sweep) -> None:
    _, results, store, trials = ray_train_sweep
    assert len(trials) == TRIALS
    client = MlflowClient(f"sqlite:///{store}")
    for trial_id, child in trials.items():
        assert child.info.status == "FINISHED" and child.data.tags["artefact.outcome"] in ("completed", "stopped_early")
        steps = [point.step for point in client.get_metric_history(child.info.run_id, "epoch")]
        assert steps == list(range(1, len(steps) + 1)) and 1 <= len(steps) <= EPOCHS
        best = Path(child.data.tags["artefact.best_checkpoint"])
        assert best.parent == results / "wrapped" / "train" / f"train-{trial_id}" and best.is_dir()
        assert child.data.tags["artefact.evaluation"]  # the best epoch's figures
    assert (results / "wrapped" / "leaderboard.md").is_file()
