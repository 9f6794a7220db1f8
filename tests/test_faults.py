"""Faults a long sweep meets, survived with real processes, a real Ray cluster and real
MLflow stores: every requested trial accounted for, every reported epoch kept exactly once.

Each scenario's numbers (trials, epochs, lost rows) are read back from the MLflow store.
The driver SIGKILL + --resume scenario is ``test_sweep.py::test_resume_after_sigkill...``;
a SLURM requeue is ``test_slurm.py``.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from builders import free_port
from conftest import RAY_TRAIN_GROUP
from mlflow.tracking import MlflowClient
from sweep_helpers import (
    REPO,
    bench_command,
    kill_process_tree,
    ray_cluster_processes,
    sqlite_experiment_made,
    start_mlflow_server,
    sweep_runs,
)

from artefact.tracking.vocabulary import REASON_TAG, RESUME_NOTE_TAG
from artefact.train.faults import FAULT_ENV
from artefact.tune.ray_env import sweep_token_file

pytestmark = [pytest.mark.slow, pytest.mark.ray]

EPOCHS = 4


def _epoch_steps(client: MlflowClient, run_id: str, key: str = "epoch") -> list[int]:
    return sorted(point.step for point in client.get_metric_history(run_id, key))


def read_back(client: MlflowClient, child, reported: list[dict]) -> tuple[int, int, int]:
    """(metric rows a trial reported to Tune, those its MLflow run lacks, rows the run holds
    twice), counted by reading the run back. A restarted trial reports some epochs twice;
    the run must hold each (epoch, metric) once, as the first attempt logged it (a re-run
    epoch is not logged again, and its metrics may differ: a class's IoU that one attempt
    could not score, another may)."""
    held: dict[str, list[int]] = {key: _epoch_steps(client, child.info.run_id, key) for key in child.data.metrics}
    first: dict[int, dict] = {}
    for row in reported:
        first.setdefault(int(row["epoch"]), row)
    wanted = {(key, epoch) for epoch, row in first.items() for key in row if key == "epoch" or "/" in key}
    lost = sum(epoch not in held.get(key, []) for key, epoch in wanted)
    doubled = sum(len(steps) - len(set(steps)) for steps in held.values())
    return len(wanted), lost, doubled


def _trial_dir(sweep_dir: Path, encoder: str, seed: int | str) -> Path | None:
    found = [p for p in (sweep_dir / "tune").glob("_run_trial_*") if f"encoder={encoder},seed={seed}" in p.name]
    return found[0] if found else None


def _reported_by(sweep_dir: Path, child) -> list[dict]:
    """What the child run's trial reported to Tune, every attempt included."""
    return _reported(_trial_dir(sweep_dir, child.data.params["encoder"], child.data.params["seed"]))


def _reported(trial_dir: Path) -> list[dict]:
    result = trial_dir / "result.json"
    if not result.is_file():
        return []
    return [json.loads(line) for line in result.read_text().splitlines() if line.strip()]


def _trial_checkpoints(sweep_dir: Path, trainer: str, encoder: str, seed: int) -> tuple[list[Path], list[dict]]:
    """(a trial's checkpoint folders, oldest first; what it reported to Tune): Tune keeps them
    in the trial's folder, Ray Train in its run's folder, ``train/train-<trial id>``."""
    trial_dir = _trial_dir(sweep_dir, encoder, seed)
    reports = _reported(trial_dir) if trial_dir is not None else []
    if not reports:
        return [], []
    folder = trial_dir if trainer == "in_process" else sweep_dir / "train" / f"train-{reports[0]['trial_id']}"
    return sorted(path for path in folder.glob("checkpoint_*") if path.is_dir()), reports  # not Train's .json


def _training_process(trainer: str, token_file: Path, reports: list[dict]) -> int | None:
    """The process that trains a trial: Tune's trial process itself, or the trial's Ray
    Train worker, which works in its run's folder (``train-<trial id>``)."""
    if trainer == "in_process":
        return reports[-1]["pid"]
    for pid in _train_workers(token_file):
        try:
            if f"train-{reports[0]['trial_id']}" in psutil.Process(pid).cwd():
                return pid
        except psutil.Error:
            continue
    return None


@pytest.mark.parametrize(
    "trainer", ["in_process", pytest.param("ray_train", marks=pytest.mark.xdist_group(RAY_TRAIN_GROUP))]
)
def test_killed_trial_corrupt_checkpoint_nan_and_oom_in_one_sweep(
    tmp_path: Path, synthetic_workspace: Path, fault_survived, trainer: str
) -> None:
    """A fair sweep of two encoders x two seeds: one trial's training process is SIGKILLed
    mid-epoch after its latest checkpoint was corrupted; one's loss turns NaN; one runs out
    of memory the way CUDA says it; the fourth is untouched. The sweep ends with all four
    accounted for, and the leaderboard ranks the encoder that completed by its mean and std.
    Under both trainers: Tune restarts an in-process trial, Ray Train its worker."""
    store, results = tmp_path / "mlflow.db", tmp_path / "results"
    environment = {
        **os.environ,
        FAULT_ENV: "nan@2:encoder=tu-test_resnet,seed=0; oom@2:encoder=tu-test_resnet,seed=1",
    }
    command = bench_command(
        results,
        synthetic_workspace,
        store,
        "--name",
        "faults",
        "--mode",
        "fair",
        "--encoders",
        "tu-test_convnext,tu-test_resnet",
        "--seeds",
        "2",
        "--epochs",
        str(EPOCHS),
        "--set",
        "data.crops_per_image=2",
        "--set",
        "train.max_failures=1",  # one restart for the killed trial
        "--set",
        f"resources.trainer={trainer}",
    )
    process = subprocess.Popen(
        command, cwd=REPO, env=environment, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        # Wait for the convnext seed-0 trial's second checkpoint, then corrupt it and kill
        # the trial's process while it trains epoch 3.
        deadline = time.monotonic() + 400
        victim = None
        while victim is None:
            assert process.poll() is None, process.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the trial never reached its second checkpoint"
            time.sleep(0.5)
            checkpoints, reports = _trial_checkpoints(results / "faults", trainer, "tu-test_convnext", 0)
            if len(checkpoints) == 2 and (checkpoints[1] / "checkpoint.pt").is_file() and len(reports) == 2:
                victim = _training_process(trainer, sweep_token_file(results, "faults"), reports)
        corrupt = checkpoints[1] / "checkpoint.pt"
        corrupt.write_bytes(b"\x00 half-written by a dying node \x00")
        # Killed at once: epoch 3 lasts about 2 s here, and a pause of 1 s once let it end first.
        assert _trial_checkpoints(results / "faults", trainer, "tu-test_convnext", 0)[0] == checkpoints, (
            "epoch 3 ended before the kill; the kill would not be mid-epoch"
        )
        os.kill(victim, signal.SIGKILL)
        stdout, stderr = process.communicate(timeout=600)
    finally:
        if process.poll() is None:
            kill_process_tree(process)
    stdout, stderr = stdout.decode(), stderr.decode()
    assert process.returncode == 0, stderr[-3000:]

    client = MlflowClient(f"sqlite:///{store}")
    parent, children = sweep_runs(store, "faults")
    assert parent.info.status == "FINISHED"
    assert len(children) == 4 and len({c.data.tags["artefact.trial_id"] for c in children}) == 4
    by_config = {(c.data.params["encoder"], c.data.params["seed"]): c for c in children}

    killed = by_config[("tu-test_convnext", "0")]
    assert killed.info.status == "FINISHED" and killed.data.tags["artefact.outcome"] == "completed"
    note = killed.data.tags[RESUME_NOTE_TAG]
    assert str(corrupt) in note and checkpoints[0].name in note, note
    untouched = by_config[("tu-test_convnext", "1")]
    assert untouched.data.tags["artefact.outcome"] == "completed"
    rows = 0
    for trial in (killed, untouched):
        assert _epoch_steps(client, trial.info.run_id) == list(range(1, EPOCHS + 1))
        checked, lost, doubled = read_back(client, trial, _reported_by(results / "faults", trial))
        assert (lost, doubled) == (0, 0)
        rows += checked

    diverged = by_config[("tu-test_resnet", "0")]
    assert diverged.info.status == "FAILED" and diverged.data.tags["artefact.outcome"] == "failed"
    assert "NaN or infinite at epoch 2" in diverged.data.tags[REASON_TAG]
    assert _epoch_steps(client, diverged.info.run_id) == [1]  # stopped at once, not after epoch 4

    out_of_memory = by_config[("tu-test_resnet", "1")]
    assert out_of_memory.info.status == "FAILED"
    reason = out_of_memory.data.tags[REASON_TAG]
    assert "out of GPU memory at epoch 2" in reason and "train.batch_size=8" in reason, reason
    assert _epoch_steps(client, out_of_memory.info.run_id) == [1]

    # A failure a restart would repeat is not trained again: the restart (Tune's of the trial,
    # or Train's of its worker) fails at once with the reason its first attempt recorded, and
    # the epoch 1 that attempt logged is kept.
    for trial in (diverged, out_of_memory):
        errors = (_trial_dir(results / "faults", "tu-test_resnet", trial.data.params["seed"]) / "error.txt").read_text()
        if trainer == "in_process":
            first, restart = errors.split("Failure # 2")
            assert "_raise_recorded" not in first and "_raise_recorded" in restart
        else:  # Train raises its last attempt's error to Tune, which does not retry it
            assert "Failure # 2" not in errors and "_raise_recorded" in errors, errors[-2000:]
        checked, lost, doubled = read_back(client, trial, _reported_by(results / "faults", trial))
        assert (lost, doubled) == (0, 0)
        rows += checked

    board = (results / "faults" / "leaderboard.md").read_text()
    ranked, _, failures = board.partition("Failed trials")
    assert "tu-test_convnext" in ranked and "tu-test_resnet" not in ranked
    assert (
        "(encoder=tu-test_resnet, batch_size=8, lr=0.002, seed=1): TrialOutOfMemory: out of GPU memory" in failures
    ), failures
    assert "train.batch_size=8, data.resolution=64" in failures
    assert (
        "(encoder=tu-test_resnet, batch_size=8, lr=0.002, seed=0): TrainingDiverged: the training loss became NaN"
        in failures
    )
    assert "failed" in stdout and "out of GPU memory" in stdout

    # Fair mode: the two completed seeds give a mean and a std; no Optuna plots.
    assert "±" in ranked
    board_rows = list(csv.DictReader((results / "faults" / "leaderboard.csv").open()))
    assert [(r["encoder"], r["trials"]) for r in board_rows] == [("tu-test_convnext", "2")]
    assert all(r["miou_fine_std"] != "" for r in board_rows)
    plots = sorted(p.name for p in (results / "faults" / "plots").iterdir())
    assert plots == ["iou_per_class.png", "speed_quality.png", "validation_curves.png"]
    fault_survived(f"trial process SIGKILLed mid-epoch ({trainer})", rows)
    for scenario in ("corrupt checkpoint on restart", "NaN loss", "out of memory"):
        fault_survived(f"{scenario} ({trainer})")  # the same sweep's rows


OUTAGE_S = 15


def _logged_epochs(uri: str, sweep: str) -> int:
    """Epochs logged so far by the sweep's trials (0 while the sweep has none)."""
    if uri.startswith("sqlite:///") and not sqlite_experiment_made(Path(uri.removeprefix("sqlite:///")), sweep):
        return 0
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(sweep)
    if experiment is None:
        return 0
    runs = client.search_runs([experiment.experiment_id], "tags.`artefact.role` = 'trial'")
    return min((len(client.get_metric_history(r.info.run_id, "epoch")) for r in runs), default=0)


def test_two_sweeps_into_one_server_keep_every_epoch_through_its_outage(
    tmp_path: Path, synthetic_workspace: Path, synthetic_cache: Path, fault_survived
) -> None:
    """Two sweeps at once log into one MLflow server, which is killed mid-sweep and started
    again 15 s later. Training goes on; the epochs held meanwhile reach the server once it
    is back; neither sweep joins or corrupts the other."""
    store, port = tmp_path / "mlflow.db", free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(store, port)
    encoders = {"north": "tu-test_convnext", "south": "tu-test_resnet"}
    sweeps = {
        name: subprocess.Popen(
            bench_command(
                tmp_path / name,
                synthetic_workspace,
                uri,
                "--name",
                name,
                "--mode",
                "fair",
                "--encoders",
                encoder,
                "--seeds",
                "1",
                "--epochs",
                str(EPOCHS + 1),
                "--set",
                "data.crops_per_image=2",
            ),
            cwd=REPO,
            start_new_session=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for name, encoder in encoders.items()
    }
    try:
        deadline = time.monotonic() + 400
        while min(_logged_epochs(uri, name) for name in sweeps) < 1:
            assert all(p.poll() is None for p in sweeps.values()), "a sweep ended before the outage"
            assert time.monotonic() < deadline, "the sweeps logged no epoch in time"
            time.sleep(1)
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
        outage = (time.time(), time.time() + OUTAGE_S)
        time.sleep(OUTAGE_S)
        assert all(p.poll() is None for p in sweeps.values()), "a sweep stopped during the outage"
        server = start_mlflow_server(store, port)
        outputs = {name: process.communicate(timeout=600) for name, process in sweeps.items()}
    finally:
        for process in sweeps.values():
            if process.poll() is None:
                kill_process_tree(process)
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)

    for name, process in sweeps.items():
        assert process.returncode == 0, outputs[name][1].decode()[-3000:]
    client = MlflowClient(f"sqlite:///{store}")
    held_during_outage = rows = 0
    for name, encoder in encoders.items():
        parent, children = sweep_runs(store, name)
        assert parent.info.status == "FINISHED"
        assert len(children) == 1, [c.info.run_name for c in children]
        (child,) = children
        assert child.data.params["encoder"] == encoder and child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.tags["artefact.outcome"] == "completed"
        reported = _reported_by(tmp_path / name / name, child)
        assert [row["epoch"] for row in reported] == list(range(1, EPOCHS + 2))
        checked, lost, doubled = read_back(client, child, reported)
        assert (lost, doubled) == (0, 0)
        rows += checked
        stamps = [point.timestamp / 1000 for point in client.get_metric_history(child.info.run_id, "epoch")]
        held_during_outage += sum(outage[0] <= stamp <= outage[1] for stamp in stamps)
        assert "MLflow lacks" not in outputs[name][0].decode()
    assert held_during_outage >= 2, "no epoch ended while the server was away: the outage proved nothing"
    assert {e.name for e in client.search_experiments()} >= set(encoders)
    with sqlite3.connect(store) as database:
        assert database.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    fault_survived("MLflow server down mid-sweep", rows)
    fault_survived("two sweeps at once into one MLflow store")  # the same rows


def test_an_mlflow_server_that_never_comes_back_ends_the_sweep_listing_what_each_run_lacks(
    tmp_path: Path, synthetic_workspace: Path, synthetic_cache: Path, fault_survived
) -> None:
    """The server is killed once both trials have logged an epoch, and does not come back.
    The trials train on and give up on it ``ARTEFACT_STORE_PATIENCE_S`` after they end; the
    sweep exits with code 4, naming each run and the epochs it lacks, which are exactly those
    the store lacks. Once the store is back, ``--resume`` writes the report, listing them."""
    store, port = tmp_path / "mlflow.db", free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(store, port)
    command = bench_command(
        tmp_path / "results",
        synthetic_workspace,
        uri,
        *("--name", "lost", "--mode", "fair", "--encoders", "tu-test_convnext,tu-test_resnet", "--seeds", "1"),
        *("--epochs", str(EPOCHS)),
    )
    patience = {"ARTEFACT_STORE_PATIENCE_S": "5", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    sweep = subprocess.Popen(
        command,
        cwd=REPO,
        env={**os.environ, **patience},
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        client = MlflowClient(uri)
        deadline = time.monotonic() + 400
        while True:
            experiment = client.get_experiment_by_name("lost")
            trials = "tags.`artefact.role` = 'trial'"
            runs = client.search_runs([experiment.experiment_id], trials) if experiment else []
            if len(runs) == 2 and all(client.get_metric_history(r.info.run_id, "epoch") for r in runs):
                break
            assert sweep.poll() is None, sweep.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the trials logged no epoch in time"
            time.sleep(1)
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
        output, errors = sweep.communicate(timeout=600)
    finally:
        if sweep.poll() is None:
            kill_process_tree(sweep)
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
    assert sweep.returncode == 4, errors[-3000:]
    assert "Traceback" not in errors
    told = dict(re.findall(r"incomplete: run (\w+) \(trial \w+\) lacks (.+)", errors))
    assert len(told) == 2, errors[-3000:]
    assert "--resume --name lost writes the report" in errors

    # What the sweep said each run lacks is what the store lacks: no epoch lost silently.
    reader = MlflowClient(f"sqlite:///{store}")
    rows = 0
    for run_id, lacking in told.items():
        held = _epoch_steps(reader, run_id)
        said = sorted(int(what.removeprefix("epoch ")) for what in lacking.split(", "))
        assert held and said and sorted(held + said) == list(range(1, EPOCHS + 1)), (held, said)
        rows += len(held)

    # With the store back, --resume writes the report and lists the epochs that stay missing.
    server = start_mlflow_server(store, port)
    try:
        resumed = subprocess.run(
            [*command, "--resume"], cwd=REPO, capture_output=True, text=True, timeout=600, env=os.environ
        )
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "rank  encoder" in resumed.stdout
    assert len(re.findall(r"MLflow lacks epochs \[[\d, ]+\] of trial", resumed.stdout)) == 2, resumed.stdout[-3000:]
    print(f"store gone for good: runs lack {told}; the store held {rows} epoch rows; after --resume:")
    print("\n".join(re.findall(r"MLflow lacks epochs .*", resumed.stdout)))
    fault_survived("MLflow server gone for good mid-sweep", rows)


def _train_workers(token_file: Path) -> set[int]:
    """PIDs of the Ray Train worker processes of the sweep whose cluster uses ``token_file``."""
    return {pid for pid, command in ray_cluster_processes(token_file).items() if "RayTrainWorker" in command}


@pytest.mark.xdist_group(RAY_TRAIN_GROUP)
def test_a_killed_ray_train_worker_restarts_its_ddp_trial_from_its_checkpoint(
    tmp_path: Path, synthetic_workspace: Path, fault_survived
) -> None:
    """A DDP trial (two Ray Train workers, gloo on the CPU): one worker's process is
    SIGKILLed in epoch 2. Ray Train starts the workers again from the epoch-1 checkpoint,
    and the trial finishes in its one MLflow run, each epoch logged once."""
    store, results = tmp_path / "mlflow.db", tmp_path / "results"
    token = sweep_token_file(results, "ddp")
    command = bench_command(
        results,
        synthetic_workspace,
        store,
        *("--name", "ddp", "--mode", "fair", "--encoders", "tu-test_convnext", "--seeds", "1", "--epochs", "3"),
        *("--set", "resources.workers_per_trial=2", "--set", "resources.cpus_per_worker=0.95"),
        *("--set", "resources.trainer=ray_train"),
        *("--set", "train.batch_size=4", "--set", "data.crops_per_image=2"),
    )
    process = subprocess.Popen(
        command, cwd=REPO, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 400
        while _logged_epochs(f"sqlite:///{store}", "ddp") < 1 or len(_train_workers(token)) < 2:
            assert process.poll() is None, process.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the DDP trial logged no epoch in time"
            time.sleep(0.5)
        before = _train_workers(token)
        os.kill(max(before), signal.SIGKILL)
        assert _logged_epochs(f"sqlite:///{store}", "ddp") == 1, "epoch 2 ended before the kill"
        restarted: set[int] = set()
        while process.poll() is None and time.monotonic() < deadline + 300:
            restarted |= _train_workers(token) - before
            time.sleep(0.5)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            kill_process_tree(process)
    assert process.returncode == 0, stderr.decode()[-3000:]
    assert len(restarted) >= 2, "Ray Train did not start new workers"

    client = MlflowClient(f"sqlite:///{store}")
    _, children = sweep_runs(store, "ddp")
    assert len(children) == 1
    (child,) = children
    assert child.data.tags["artefact.outcome"] == "completed" and child.info.status == "FINISHED"
    assert child.data.params["workers"] == "2"
    assert _epoch_steps(client, child.info.run_id) == [1, 2, 3]
    reported = _reported_by(results / "ddp", child)
    assert [row["epoch"] for row in reported] == [1, 2, 3]  # resumed after epoch 1, not from scratch
    checked, lost, doubled = read_back(client, child, reported)
    assert (lost, doubled) == (0, 0)
    fault_survived("Ray Train worker SIGKILLed mid-epoch (DDP trial)", checked)
