"""Running the real main job in a subprocess and reading its MLflow store back."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "sweeps" / "encoder_bench.py"


def bench_command(results: Path, workspace: Path, store: Path, *args: str) -> list[str]:
    return [
        sys.executable,
        str(BENCH),
        "--results",
        str(results),
        "--workspace",
        str(workspace),
        "--tracking-uri",
        f"sqlite:///{store}",
        *args,
    ]


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
