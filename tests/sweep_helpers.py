"""Running the real main job in a subprocess and reading its MLflow store back."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "sweeps" / "encoder_bench.py"
TRIAL_ACTORS = ("ImplicitFunc", "TrialDriver")
"""Tune's actor class for a function trial: reused (``in_process``), or one per trial and
named after it (``ray_train``)."""


def sqlite_experiment_made(store: Path, name: str) -> bool:
    """Whether a sweep has made its experiment in the SQLite store: until then it may still be
    creating the store's tables, and an MLflow client opened here would create them too and
    make the sweep fail ("table ... already exists"). Read only, so it creates nothing."""
    try:
        with closing(sqlite3.connect(f"file:{store}?mode=ro", uri=True)) as db:
            return db.execute("SELECT 1 FROM experiments WHERE name = ?", (name,)).fetchone() is not None
    except sqlite3.OperationalError:  # no file yet, or no table yet
        return False


def import_script(name: str, folder: str = "sweeps"):
    """``<folder>/<name>.py`` (a script of sweeps/ or bench/) as a module, to call its functions
    in process (fast, and capsys sees their output). It is registered under its name first:
    dataclasses look it up there."""
    spec = importlib.util.spec_from_file_location(name, REPO / folder / f"{name}.py")
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_command(results: Path, workspace: Path, store: Path | str, *args: str) -> list[str]:
    """The main job's command line; ``store`` is a SQLite file or a server's URL."""
    uri = store if isinstance(store, str) else f"sqlite:///{store}"
    return [
        sys.executable,
        str(BENCH),
        "--results",
        str(results),
        "--workspace",
        str(workspace),
        "--tracking-uri",
        uri,
        *args,
    ]


def start_mlflow_server(store: Path, port: int, timeout: float = 120) -> subprocess.Popen:
    """``python -m artefact ui`` (an MLflow server) on ``store``, once it answers on loopback."""
    server = subprocess.Popen(
        [sys.executable, "-m", "artefact", "ui", "--tracking-uri", f"sqlite:///{store}", "--port", str(port)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout
    while True:
        assert server.poll() is None, "the MLflow server exited at start"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return server
        except OSError:
            assert time.monotonic() < deadline, f"the MLflow server did not answer within {timeout:.0f} s"
            time.sleep(1)


def run_bench(results: Path, workspace: Path, store: Path, *args: str, timeout: int = 600):
    return subprocess.run(
        bench_command(results, workspace, store, *args), capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def sweep_runs(store: Path, sweep: str) -> tuple[object, list]:
    """(parent run, child runs) of one sweep, read straight from the store."""
    client = MlflowClient(f"sqlite:///{store}")
    experiment = client.get_experiment_by_name(sweep)
    assert experiment is not None, f"no MLflow experiment {sweep}"
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("artefact.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("artefact.role") == "trial"]
    assert len(parents) == 1, f"expected one parent run, found {len(parents)}"
    return parents[0], children


def kill_process_tree(process: subprocess.Popen) -> None:
    """SIGKILL the sweep and everything it started (its Ray cluster included)."""
    try:
        tree = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    os.killpg(process.pid, signal.SIGKILL)
    for child in tree:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    process.wait(timeout=30)


def ray_cluster_processes(token_file: Path) -> dict[int, str]:
    """pid -> command line of the processes of the one Ray cluster that uses ``token_file``:
    each carries its path in its environment. Tests run two at a time, so a test must never
    act on another test's Ray processes."""
    path = str(token_file.resolve())
    return {
        process.pid: " ".join(process.info["cmdline"] or [])
        for process in psutil.process_iter(["cmdline", "environ"])
        if (process.info["environ"] or {}).get("RAY_AUTH_TOKEN_PATH") == path
    }


@dataclass
class WatchedSweep:
    """A finished main job, and what its Ray dashboard's API answered while it ran."""

    returncode: int
    stdout: str
    stderr: str
    dashboard_url: str | None = None
    unauthenticated_status: int | None = None
    nodes: list[dict] = field(default_factory=list)
    actors: list[dict] = field(default_factory=list)
    train_runs: dict[str, dict] = field(default_factory=dict)
    """The Train view's runs (Train V2's ``/api/train/v2/runs/v1``) by name, each as last seen
    with workers in its latest attempt (a run just created has an attempt with none yet)."""


def _dashboard_get(url: str, token: str | None) -> tuple[int, dict]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, {}
    except OSError:  # the sweep stops its cluster (and dashboard) as it ends
        return 0, {}


def run_bench_watching_dashboard(
    results: Path, workspace: Path, store: Path, name: str, *args: str, timeout: int = 600, watch_train: bool = False
) -> WatchedSweep:
    """Run the main job; while its trials run, ask its dashboard for nodes and actors (and
    with ``watch_train``, Train's runs), with the sweep's token and without one."""
    process = subprocess.Popen(
        bench_command(results, workspace, store, "--name", name, *args),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    out: list[str] = []
    err: list[str] = []
    readers = [
        threading.Thread(target=lambda: out.extend(process.stdout), daemon=True),
        threading.Thread(target=lambda: err.extend(process.stderr), daemon=True),
    ]
    for reader in readers:
        reader.start()
    watched = WatchedSweep(-1, "", "")
    token_file = results / ".ray-tokens" / f"{name}.token"
    deadline = time.monotonic() + timeout
    try:
        while process.poll() is None and time.monotonic() < deadline:
            time.sleep(1)
            if watched.dashboard_url is None:
                found = re.search(r"Ray dashboard: (http://\S+)", "".join(out))
                watched.dashboard_url = found.group(1) if found else None
                continue
            token = token_file.read_text().strip()
            if watch_train:
                status, runs = _dashboard_get(f"{watched.dashboard_url}/api/train/v2/runs/v1", token)
                for run in runs.get("train_runs", []) if status == 200 else []:
                    if run["name"] not in watched.train_runs or (run["attempts"] and run["attempts"][-1]["workers"]):
                        watched.train_runs[run["name"]] = run
            if watched.actors:
                continue
            watched.unauthenticated_status, _ = _dashboard_get(f"{watched.dashboard_url}/api/v0/nodes", None)
            _, nodes = _dashboard_get(f"{watched.dashboard_url}/api/v0/nodes", token)
            _, actors = _dashboard_get(f"{watched.dashboard_url}/api/v0/actors?limit=1000&detail=true", token)
            watched.nodes = nodes.get("data", {}).get("result", {}).get("result", [])
            alive = [a for a in actors.get("data", {}).get("result", {}).get("result", []) if a.get("state") == "ALIVE"]
            if any(a.get("class_name", "") in TRIAL_ACTORS for a in alive):
                watched.actors = alive
        if process.poll() is None:
            kill_process_tree(process)
    finally:
        process.wait()
        for reader in readers:
            reader.join(timeout=10)
    watched.returncode, watched.stdout, watched.stderr = process.returncode, "".join(out), "".join(err)
    return watched
