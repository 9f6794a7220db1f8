"""The main job end to end on a real local Ray cluster and a real MLflow store."""

from __future__ import annotations

import csv
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from image_checks import assert_drawn
from mlflow.tracking import MlflowClient
from sweep_helpers import bench_command, kill_process_tree, run_bench, sqlite_experiment_made, sweep_runs

from artefact.report.figures import CONFUSION_SIZE, CURVES_SIZE, HEATMAP_SIZE, SCATTER_SIZE
from artefact.train.evaluation import PREDICTION_IMAGES

pytestmark = [pytest.mark.slow, pytest.mark.ray]

REPO = Path(__file__).resolve().parents[1]


def test_default_sweep_logs_every_trial_and_asha_stops_some(default_sweep) -> None:
    done, results, store = default_sweep
    assert done.returncode == 0, done.stderr[-3000:]
    assert "no --profile given: using cpu-smoke" in done.stdout
    assert "Ray dashboard: http://127.0.0.1:" in done.stdout

    parent, children = sweep_runs(store, "default")
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["profile"] == "cpu-smoke"
    assert len(children) == 4
    assert len({c.data.tags["artefact.trial_id"] for c in children}) == 4
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    encoders = {c.data.params["encoder"] for c in children}
    assert encoders == {"tu-test_convnext", "tu-test_resnet"}
    for child in children:
        assert child.info.status == "FINISHED"
        for key in (
            "encoder",
            "arch",
            "heads",
            "batch_size",
            "lr",
            "resolution",
            "amp",
            "seed",
            "loss_weight_binary",
            "loss_weight_coarse",
            "loss_weight_fine",
            "loss_kind",
            "class_weights",
        ):
            assert key in child.data.params, key
        assert child.data.params["weights_source"] == "none"  # cpu-smoke trains from scratch
        for key in (
            "train/loss",
            "val/loss",
            "val/miou_fine",
            "val/miou_coarse",
            "val/miou_binary",
            "perf/img_per_s",
            "perf/epoch_s",
            "perf/peak_mem_mb",
            "model/params",
            "model/gflop_per_image",
        ):
            assert key in child.data.metrics, key
        assert any(k.startswith("val/iou/") for k in child.data.metrics)
        assert child.data.tags["artefact.best_checkpoint"]
    outcomes = [c.data.tags["artefact.outcome"] for c in children]
    assert "stopped_early" in outcomes, outcomes
    assert set(outcomes) <= {"completed", "stopped_early"}

    # The default configuration (weights 0.2/0.3/0.5) runs first on each encoder.
    defaults = [c for c in children if c.data.params["loss_weight_fine"] == "0.5"]
    assert {c.data.params["encoder"] for c in defaults} == encoders

    client = MlflowClient(f"sqlite:///{store}")
    history = client.get_metric_history(children[0].info.run_id, "val/miou_fine")
    assert sorted(m.step for m in history) == list(range(1, len(history) + 1))
    assert len(parent.data.tags["mlflow.source.git.commit"]) == 40  # the checkout it ran from

    board = results / "default" / "leaderboard.csv"
    rows = list(csv.DictReader(board.open()))
    assert [r["encoder"] for r in rows] and {r["encoder"] for r in rows} == encoders
    assert float(rows[0]["miou_fine"]) >= float(rows[-1]["miou_fine"])
    for row in rows:  # cost next to quality; no GPU here, so no GPU-hours
        assert 0 < float(row["to_best_min"]) <= float(row["train_min"]) and row["gpu_h"] == ""
        assert int(row["batch"]) in (4, 8) and float(row["lr"]) > 0
    assert "miou_fine" in done.stdout and "tu-test_convnext" in done.stdout


def _artifact_files(client: MlflowClient, run_id: str, folder: str | None = None) -> set[str]:
    """Every artifact path of a run (recursively), as MLflow lists them."""
    found = set()
    for entry in client.list_artifacts(run_id, folder):
        found |= _artifact_files(client, run_id, entry.path) if entry.is_dir else {entry.path}
    return found


def _artifact_yaml(client: MlflowClient, run_id: str, path: str, folder: Path) -> dict:
    return yaml.safe_load(Path(client.download_artifacts(run_id, path, str(folder))).read_text())


def test_default_sweep_logs_figures_a_researcher_can_use(default_sweep, tmp_path: Path) -> None:
    done, _, store = default_sweep
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{store}")
    parent, children = sweep_runs(store, "default")

    plots = ["speed_quality", "iou_per_class", "validation_curves", "optuna_history", "optuna_importances"]
    parent_files = _artifact_files(client, parent.info.run_id)
    expected = {"config.yaml", "space.json", "profile.yaml", "leaderboard.csv", "leaderboard.md", "trials.csv"}
    assert expected | {f"plots/{name}.png" for name in plots} <= parent_files, parent_files
    sizes = dict(zip(plots, (SCATTER_SIZE, HEATMAP_SIZE, CURVES_SIZE, CURVES_SIZE, CURVES_SIZE), strict=True))
    for name, size in sizes.items():
        assert_drawn(Path(client.download_artifacts(parent.info.run_id, f"plots/{name}.png", str(tmp_path))), size)

    for child in children:
        files = _artifact_files(client, child.info.run_id)
        assert {"config.yaml", "model_summary.yaml", "class_weights.csv"} <= files, files
        evaluation = child.data.tags["artefact.evaluation"]  # set once the folder is complete
        assert re.fullmatch(r"evaluation/epoch_\d{3}", evaluation)
        if child.data.tags["artefact.outcome"] == "completed":  # figures are drawn for the best epoch
            history = client.get_metric_history(child.info.run_id, "val/miou_fine")
            best_epoch = max(history, key=lambda point: (point.value, -point.step)).step
            assert evaluation == f"evaluation/epoch_{best_epoch:03d}", (evaluation, history)
        names = sorted(path.removeprefix(evaluation + "/") for path in files if path.startswith(evaluation + "/"))
        assert names[:3] == ["confusion_binary.png", "confusion_coarse.png", "confusion_fine.png"], names
        assert len([n for n in names if n.startswith("prediction_")]) == PREDICTION_IMAGES, names
        confusion = client.download_artifacts(child.info.run_id, f"{evaluation}/confusion_fine.png", str(tmp_path))
        assert_drawn(Path(confusion), CONFUSION_SIZE)
        summary = _artifact_yaml(client, child.info.run_id, "model_summary.yaml", tmp_path)
        assert summary["encoder"] == child.data.params["encoder"]
        assert summary["parameters"] == int(child.data.metrics["model/params"])
        forward = summary["gflop_forward_per_image"]
        assert forward == pytest.approx(child.data.metrics["model/gflop_per_image"], abs=1e-3) and forward > 0
        assert summary["gflop_training_per_image"] == pytest.approx(3 * forward, abs=2e-3)
        config = _artifact_yaml(client, child.info.run_id, "config.yaml", tmp_path)
        assert config["model"]["encoder"] == child.data.params["encoder"]
        assert config["train"]["batch_size"] == int(child.data.params["batch_size"])


def test_default_sweep_terminal_output_is_a_short_log_not_ray_noise(default_sweep) -> None:
    done, results, _ = default_sweep
    lines = done.stdout.splitlines()
    assert "Configuration for experiment" not in done.stdout  # Tune's own tables stay off
    assert "INFO" not in done.stdout + done.stderr
    assert sum(line.strip().startswith("trials: ") and "done" in line for line in lines) == 4
    assert any(re.match(r"\[ *\d+:\d\d\] epoch ", line) for line in lines)
    assert f"results: {results / 'default'}/" in done.stdout
    parent, _ = sweep_runs(default_sweep[2], "default")
    assert f"#/experiments/{parent.info.experiment_id}/runs/{parent.info.run_id}" in done.stdout
    assert "python -m artefact ui --tracking-uri sqlite:///" in done.stdout


def test_ray_dashboard_answers_on_loopback_with_the_token_while_the_sweep_runs(default_sweep) -> None:
    done = default_sweep[0]
    assert done.dashboard_url is not None and done.dashboard_url.startswith("http://127.0.0.1:")
    assert done.unauthenticated_status == 401  # the API refuses requests without the sweep's token
    assert [node["node_ip"] for node in done.nodes] == ["127.0.0.1"]
    classes = {actor["class_name"] for actor in done.actors}
    assert "ImplicitFunc" in classes and "TrialDriver" not in classes, classes  # in_process: reused actors


def _trial_runs(store: Path, sweep: str) -> list:
    if not sqlite_experiment_made(store, sweep):
        return []
    client = MlflowClient(f"sqlite:///{store}")
    experiment = client.get_experiment_by_name(sweep)
    if experiment is None:
        return []
    return client.search_runs([experiment.experiment_id], "tags.`artefact.role` = 'trial'")


def _finished_trials(store: Path, sweep: str) -> dict[str, float]:
    """Trial runs with both epochs logged: run id -> the time of their last metric (s)."""
    client = MlflowClient(f"sqlite:///{store}")
    finished = {}
    for run in _trial_runs(store, sweep):
        history = client.get_metric_history(run.info.run_id, "val/miou_fine")
        if len(history) >= 2:
            finished[run.info.run_id] = max(point.timestamp for point in history) / 1000
    return finished


def _start_until_third_trial(
    results: Path, workspace: Path, store: Path, args: tuple[str, ...], log: Path
) -> subprocess.Popen:
    """The main job (its output in ``log``), returned once its third trial has its MLflow run."""
    MlflowClient(f"sqlite:///{store}")  # the schema, made before the sweep polls it
    with log.open("w") as output:
        process = subprocess.Popen(
            bench_command(results, workspace, store, *args),
            cwd=REPO,
            start_new_session=True,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    name = args[args.index("--name") + 1]
    deadline = time.monotonic() + 400
    while len(_trial_runs(store, name)) < 3:
        assert process.poll() is None, f"the sweep ended before its third trial started: {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "the third trial did not start in time"
        time.sleep(0.5)
    return process


def test_resume_after_sigkill_finishes_exactly_the_requested_trials(
    tmp_path: Path, synthetic_workspace: Path, fault_survived
) -> None:
    store, results = tmp_path / "mlflow.db", tmp_path / "results"
    args = (
        "--name",
        "killed",
        "--trials",
        "3",
        "--epochs",
        "2",
        "--set",
        "sweep.scheduler=none",
        "--set",
        "data.crops_per_image=2",
    )
    # Killed as soon as the third trial has its run: a trial has finished by then, and the
    # third has often started after Tune last saved the sweep's state, so --resume replaces it.
    process = _start_until_third_trial(results, synthetic_workspace, store, args, tmp_path / "sweep.log")
    kill_process_tree(process)
    killed_at = time.time()
    finished_before = _finished_trials(store, "killed")
    assert finished_before

    resumed = run_bench(results, synthetic_workspace, store, *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    parent, children = sweep_runs(store, "killed")
    assert parent.info.status == "FINISHED"
    completed = [c for c in children if c.data.tags.get("artefact.outcome") == "completed"]
    trial_ids = [c.data.tags["artefact.trial_id"] for c in completed]
    assert len(trial_ids) == 3 and len(set(trial_ids)) == 3, trial_ids
    assert all(c.info.status == "FINISHED" for c in completed)
    # A trial Tune's saved state did not hold is kept, marked as replaced, and named in the output.
    replaced = [c for c in children if c not in completed]
    assert len(replaced) <= 1, [(c.data.tags["artefact.trial_id"], c.info.status) for c in replaced]
    for run in replaced:
        assert run.info.status == "KILLED" and run.data.tags["artefact.outcome"] == "replaced"
        assert f"replaced {run.data.tags['artefact.trial_id']}:" in resumed.stdout
    trials_csv = list(csv.DictReader((results / "killed" / "trials.csv").open()))
    assert len(trials_csv) == 3

    # Trials finished before the kill were not re-run: their metrics are all older than the kill.
    assert _finished_trials(store, "killed").items() >= finished_before.items()
    client = MlflowClient(f"sqlite:///{store}")
    for run_id in finished_before:
        stamps = [p.timestamp / 1000 for key in ("epoch", "val/loss") for p in client.get_metric_history(run_id, key)]
        assert max(stamps) < killed_at
    # The Optuna study in the sweep folder holds exactly the 3 trials, those from before the kill
    # included, and the replaced trial's suggestion, if any, as failed rather than running forever.
    import optuna

    study = optuna.load_study(study_name="killed", storage=f"sqlite:///{results / 'killed' / 'optuna.db'}")
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 3, states
    assert states.count(optuna.trial.TrialState.FAIL) == len(replaced), states
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    by_id = {c.info.run_id: c for c in children}
    for run_id in finished_before:
        lr = float(by_id[run_id].data.params["lr"])
        assert any(abs(t.params["lr"] - lr) < 1e-9 for t in complete), (lr, [t.params for t in complete])

    fault_survived("sweep driver SIGKILLed, then --resume")
    other_space = run_bench(results, synthetic_workspace, store, *args, "--resume", "--encoders", "tu-test_resnet")
    assert other_space.returncode == 2
    assert "--resume" in other_space.stderr and "Traceback" not in other_space.stderr


def test_sigterm_saves_the_sweep_and_resume_replaces_no_trial(
    tmp_path: Path, synthetic_workspace: Path, fault_survived
) -> None:
    """``kill <pid>``, or a batch script passing on SLURM's TERM: only the sweep's process gets it."""
    store, results = tmp_path / "mlflow.db", tmp_path / "results"
    args = ("--name", "termed", "--trials", "3", "--epochs", "2", "--set", "sweep.scheduler=none")
    process = _start_until_third_trial(results, synthetic_workspace, store, args, tmp_path / "sweep.log")
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=120)
    output = (tmp_path / "sweep.log").read_text()
    assert process.returncode == 3, output[-3000:]
    assert "its state is saved. Continue it with the same command plus --resume --name termed" in output

    resumed = run_bench(results, synthetic_workspace, store, *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    parent, children = sweep_runs(store, "termed")
    outcomes = sorted(c.data.tags.get("artefact.outcome") for c in children)
    assert parent.info.status == "FINISHED" and outcomes == ["completed"] * 3, outcomes  # none replaced
    for child in children:
        steps = [p.step for p in MlflowClient(f"sqlite:///{store}").get_metric_history(child.info.run_id, "epoch")]
        assert steps == [1, 2], (child.data.tags["artefact.trial_id"], steps)  # each epoch once
    fault_survived("sweep SIGTERMed with its Ray cluster, then --resume")


def test_the_ray_token_never_reaches_mlflow_the_results_or_the_output(default_sweep, tmp_path: Path) -> None:
    """The sweep's token is read from its own file by Ray alone: no param, tag, artifact,
    results file or line of output holds it."""
    done, results, store = default_sweep
    token_file = results / ".ray-tokens" / "default.token"
    token = token_file.read_text().strip()
    assert len(token) == 64 and token_file.stat().st_mode & 0o777 == 0o600
    client = MlflowClient(f"sqlite:///{store}")
    parent, children = sweep_runs(store, "default")
    artifacts = 0
    for run in (parent, *children):
        assert not any(token in value for value in (*run.data.params.values(), *run.data.tags.values()))
        for path in _artifact_files(client, run.info.run_id):
            assert (
                token.encode() not in Path(client.download_artifacts(run.info.run_id, path, str(tmp_path))).read_bytes()
            )
            artifacts += 1
    assert artifacts > 20
    assert token not in done.stdout + done.stderr
    files = [f for f in (*results.rglob("*"), *store.parent.rglob("*")) if f.is_file() and f != token_file]
    assert len(files) > 50 and store in files
    assert [f for f in files if token.encode() in f.read_bytes()] == []
