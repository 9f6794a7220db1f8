"""The local Ray cluster a sweep starts (``artefact.ray_env``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from sweep_helpers import REPO

SCRIPT = """
import os, sys, time
from pathlib import Path
from artefact.ray_env import prepare_local_cluster

token = prepare_local_cluster(Path(sys.argv[1]))
import psutil, ray

ray.init(num_cpus=8, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)


@ray.remote(num_cpus=1, runtime_env={"env_vars": {"A_TRIAL": "1"}})  # as Tune makes its trials
class Trial:
    def pid(self):
        return os.getpid()


trial = Trial.remote()
ray.get(trial.pid.remote())
time.sleep(2)
ours = str(token.resolve())
idle = [
    p.pid
    for p in psutil.process_iter(["cmdline", "environ"])
    if (p.info["environ"] or {}).get("RAY_AUTH_TOKEN_PATH") == ours and (p.info["cmdline"] or [""])[0] == "ray::IDLE"
]
print("idle workers:", len(idle))
ray.shutdown()
"""


def test_a_local_cluster_keeps_no_idle_workers_beside_its_trials(tmp_path: Path) -> None:
    """Ray starts an idle worker per CPU ahead, but a trial (like every Tune trial and Train
    worker) carries a runtime env and gets a new process: the idle ones would only take
    memory and CPU for the whole sweep."""
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "ray.token")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "idle workers: 0" in done.stdout, done.stdout
