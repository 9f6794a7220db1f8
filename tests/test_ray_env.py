"""The local Ray cluster a sweep starts (``artefact.tune.ray_env``)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from sweep_helpers import REPO, ray_cluster_processes

SCRIPT = """
import os, sys
from pathlib import Path
from artefact.tune.ray_env import prepare_local_cluster

prepare_local_cluster(Path(sys.argv[1]))
import ray

ray.init(num_cpus=8, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)


@ray.remote(num_cpus=1, runtime_env={"env_vars": {"A_TRIAL": "1"}})  # as Tune makes its trials
class Trial:
    def pid(self):
        return os.getpid()


trial = Trial.remote()
print("trial", ray.get(trial.pid.remote()), flush=True)
sys.stdin.read()  # the cluster stays up until the test has looked at it
ray.shutdown()
"""


def test_a_local_cluster_keeps_no_idle_workers_beside_its_trials(tmp_path: Path) -> None:
    """Ray starts an idle worker per CPU ahead, but a trial (like every Tune trial and Train
    worker) carries a runtime env and gets a new process: the idle ones would only take
    memory and CPU for the whole sweep."""
    token = tmp_path / "ray.token"
    cluster = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(token)],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        if not cluster.stdout.readline().startswith("trial "):
            pytest.fail(f"the cluster did not start: {cluster.communicate(timeout=120)[1][-3000:]}")
        time.sleep(2)
        workers = ray_cluster_processes(token).values()
        assert [command for command in workers if command.startswith("ray::IDLE")] == []
    finally:
        cluster.communicate(timeout=120)
    assert cluster.returncode == 0
