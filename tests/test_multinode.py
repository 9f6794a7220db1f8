"""Several nodes for real: a SLURM cluster of two hosts, each a network namespace with its own
address and hostname (tests/slurm_hosts.sh), and a third host on the same network outside the
cluster. A sweep job spans both nodes; the Ray and MLflow servers of a multi-node job are
tried from the outsider, with and without the job's secrets."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sweep_helpers import REPO
from test_slurm import job_fields as fields_of
from test_slurm import leftover_processes, sbatch, trial_epochs, wait_for_job

from artefact.tracking.server_auth import AUTH_USER, PASSWORD_FILE

pytestmark = [pytest.mark.slow, pytest.mark.multinode]

HOSTS = REPO / "tests" / "slurm_hosts.sh"
HEAD_IP, WORKER_IP = "10.77.0.11", "10.77.0.12"
TWO_NODES = ("--nodes=2", "--cpus-per-task=1", "--mem=3G")


@pytest.fixture(scope="session")
def slurm_hosts(tmp_path_factory: pytest.TempPathFactory):
    """Two SLURM nodes (n1, n2) and an outsider host, running; SLURM_CONF points every client
    at them while the fixture lives. Everything is removed, by namespace and by pid file, also
    after a failed test."""
    folder = tmp_path_factory.mktemp("hosts")
    subprocess.run([str(HOSTS), "stop", str(folder)], capture_output=True, timeout=120)  # a crashed run's leftovers
    started = subprocess.run([str(HOSTS), "start", str(folder), "2"], capture_output=True, text=True, timeout=120)
    previous = os.environ.get("SLURM_CONF")
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        os.environ["SLURM_CONF"] = str(folder / "slurm.conf")
        yield folder
    finally:
        subprocess.run([str(HOSTS), "stop", str(folder)], check=True, timeout=120)
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
    assert not [line for line in _namespaces() if line.startswith("artefact-")]


def _namespaces() -> list[str]:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout.splitlines()


def on_host(hosts: Path, host: str, *command: str, timeout: float = 120, **options) -> subprocess.CompletedProcess:
    """``command`` run on ``host`` (n1, n2 or outsider), as that host sees itself."""
    return subprocess.run(
        [str(HOSTS), "run", str(hosts), host, *command], capture_output=True, text=True, timeout=timeout, **options
    )


def _status(host_run, url: str, header: str | None = None) -> str:
    """The HTTP status of GET ``url`` from a host, or the connection error's name."""
    script = (
        "import sys, urllib.request, urllib.error\n"
        "request = urllib.request.Request(sys.argv[1])\n"
        "if len(sys.argv) > 2: request.add_header('Authorization', sys.argv[2])\n"
        "try:\n"
        "    print(urllib.request.urlopen(request, timeout=10).status)\n"
        "except urllib.error.HTTPError as error:\n"
        "    print(error.code)\n"
        "except OSError as error:\n"
        "    print(type(getattr(error, 'reason', error)).__name__)\n"
    )
    done = host_run(sys.executable, "-c", script, url, *([header] if header else []))
    return done.stdout.strip() or done.stderr[-500:]


def test_a_sweep_job_spans_two_hosts_and_its_servers_refuse_whoever_lacks_its_secrets(
    slurm_hosts: Path, tmp_path: Path, synthetic_workspace: Path
) -> None:
    started = time.monotonic()
    results = tmp_path / "results"
    log = tmp_path / "job.log"
    # Four epochs keep the servers up long enough to be tried from the outsider.
    job = sbatch(
        log,
        *("--results", str(results), "--workspace", str(synthetic_workspace), "--name", "two-hosts"),
        *("--trials", "2", "--epochs", "4", "--set", "sweep.scheduler=none"),
        resources=TWO_NODES,
    )
    state = results / ".slurm" / "two-hosts"
    deadline = time.monotonic() + 300
    while not log.exists() or "Ray cluster:" not in log.read_text():
        assert fields_of(job)["JobState"] in ("RUNNING", "PENDING"), log.read_text()[-3000:] if log.exists() else ""
        assert time.monotonic() < deadline, "the sweep did not start within 300 s"
        time.sleep(2)
    text = log.read_text()
    gcs_port = int(re.search(r"Ray head on 10\.77\.0\.11:(\d+)", (state / f"ray-head-{job}.log").read_text()).group(1))
    dashboard_port = int(re.search(r"Ray dashboard: ssh -N -L (\d+):127\.0\.0\.1:\1 -J \S+ n1,", text).group(1))
    mlflow_port = int(re.search(rf"MLflow UI: ssh -N -L (\d+):{HEAD_IP}:\1 ", text).group(1))
    password = (state / f"mlflow-auth-{job}" / PASSWORD_FILE).read_text().strip()
    token = (state / "ray.token").read_text().strip()

    def outsider(*command: str, **options) -> subprocess.CompletedProcess:
        return on_host(slurm_hosts, "outsider", *command, **options)

    def head(*command: str, **options) -> subprocess.CompletedProcess:
        return on_host(slurm_hosts, "n1", *command, **options)

    # The dashboard (and its job API) listens on the head's loopback only...
    refusals = {"dashboard from the outsider": _status(outsider, f"http://{HEAD_IP}:{dashboard_port}/api/version")}
    refusals["job submission from the outsider"] = _status(outsider, f"http://{HEAD_IP}:{dashboard_port}/api/jobs/")
    # ...where, on the head itself, it still asks for the token.
    refusals["job list on the head without the token"] = _status(head, f"http://127.0.0.1:{dashboard_port}/api/jobs/")
    granted = {"job list on the head": _status(head, f"http://127.0.0.1:{dashboard_port}/api/jobs/", f"Bearer {token}")}
    # MLflow listens on the network, and asks for the job's password.
    search = f"http://{HEAD_IP}:{mlflow_port}/api/2.0/mlflow/experiments/search?max_results=1"
    basic = "Basic " + base64.b64encode(f"{AUTH_USER}:{password}".encode()).decode()
    wrong = "Basic " + base64.b64encode(f"{AUTH_USER}:not-the-password".encode()).decode()
    refusals["MLflow from the outsider without a password"] = _status(outsider, search)
    refusals["MLflow from the outsider with a wrong password"] = _status(outsider, search, wrong)
    granted["MLflow from the outsider"] = _status(outsider, search, basic)
    # Ray: the outsider reaches the head's port, but cannot join without the token.
    join = f"import ray; ray.init(address='{HEAD_IP}:{gcs_port}', logging_level='ERROR'); print(len(ray.nodes()))"
    without_token = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    refused_join = outsider(sys.executable, "-c", join, env=without_token)
    refusals["Ray join from the outsider"] = f"exit {refused_join.returncode}"
    assert fields_of(job)["JobState"] == "RUNNING", "the job ended before its servers were tried"
    print(f"refused: {refusals}; granted: {granted}")
    assert refusals == {
        "dashboard from the outsider": "ConnectionRefusedError",
        "job submission from the outsider": "ConnectionRefusedError",
        "job list on the head without the token": "401",
        "MLflow from the outsider without a password": "401",
        "MLflow from the outsider with a wrong password": "401",
        "Ray join from the outsider": "exit 1",
    }, refused_join.stderr[-2000:]
    assert granted == {"job list on the head": "200", "MLflow from the outsider": "200"}

    fields = wait_for_job(job, 600)
    text = log.read_text()
    assert fields["JobState"] == "COMPLETED", text[-3000:]
    assert "Ray cluster: 2 CPUs, 0 GPUs" in text  # one CPU on each node
    # The trials ran on both hosts (Tune records each result's node), and every epoch of
    # each reached the head's MLflow server exactly once, from either host.
    nodes = {}
    for result in (results / "two-hosts").glob("tune/*/result.json"):
        rows = [json.loads(line) for line in result.read_text().splitlines()]
        nodes[rows[0]["trial_id"]] = {(row["node_ip"], row["hostname"]) for row in rows}
    print(f"trials by node: {nodes}")
    assert sorted(nodes.values(), key=str) == [{(HEAD_IP, "n1")}, {(WORKER_IP, "n2")}]
    epochs = trial_epochs(state / "mlflow.db", "two-hosts")
    assert sorted(epochs) == sorted(nodes) and all(steps == [1, 2, 3, 4] for steps in epochs.values()), epochs
    # The secrets stay out of the log; the password's folder goes with the job.
    assert password not in text and token not in text
    assert not (state / f"mlflow-auth-{job}").exists()
    time.sleep(2)
    assert leftover_processes(f"/tmp/ray-{job}/", f"--port {mlflow_port}") == []
    print(f"two-host test: {time.monotonic() - started:.0f} s")


def test_a_node_killed_mid_trial_leaves_its_trial_to_continue_on_the_other_from_its_checkpoint(
    slurm_hosts: Path, tmp_path: Path, synthetic_workspace: Path, fault_survived
) -> None:
    """SIGKILL to everything on n2 (its slurmd, Ray worker and trial), as a node that loses
    power: the job goes on (--no-kill), Ray declares the node dead, and Tune restarts its
    trial on n1 from the last checkpoint, in the same MLflow run, with no epoch lost or doubled."""
    started = time.monotonic()
    results = tmp_path / "results"
    log = tmp_path / "job.log"
    epochs = 6
    job = sbatch(
        log,
        *("--results", str(results), "--workspace", str(synthetic_workspace), "--name", "lost-node"),
        *("--trials", "2", "--epochs", str(epochs), "--set", "sweep.scheduler=none"),
        resources=TWO_NODES,
    )
    sweep_dir = results / "lost-node"

    def trials_on_n2_with_an_epoch() -> list[str]:
        found = []
        for result in sweep_dir.glob("tune/*/result.json"):
            rows = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
            if rows and rows[-1]["hostname"] == "n2":
                found.append(rows[0]["trial_id"])
        return found

    deadline = time.monotonic() + 300
    while not trials_on_n2_with_an_epoch():
        assert fields_of(job)["JobState"] in ("RUNNING", "PENDING"), log.read_text()[-3000:] if log.exists() else ""
        assert time.monotonic() < deadline, "no trial reported an epoch on n2 within 300 s"
        time.sleep(1)
    [lost] = trials_on_n2_with_an_epoch()
    killed = [
        int(pid)
        for pid in subprocess.run(["ip", "netns", "pids", "artefact-n2"], capture_output=True, text=True).stdout.split()
    ]
    for pid in killed:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    try:
        fields = wait_for_job(job, 600)
        text = log.read_text()
        assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "0", text[-3000:]
        assert "has been marked dead" in text and "10.77.0.12" in text
        assert "trials: {'completed': 2, 'stopped_early': 0, 'failed': 0}" in text, text[-3000:]
        # The lost trial's epochs: the first on n2, the rest on n1 after its restart.
        result = next(sweep_dir.glob(f"tune/*{lost}*/result.json"))
        hosts = [json.loads(line)["hostname"] for line in result.read_text().splitlines() if line.strip()]
        assert hosts[0] == "n2" and hosts[-1] == "n1" and len(hosts) == epochs, hosts
        logged = trial_epochs(results / ".slurm" / "lost-node" / "mlflow.db", "lost-node")
        assert len(logged) == 2 and all(steps == list(range(1, epochs + 1)) for steps in logged.values()), logged
        fault_survived("node killed mid-trial", sum(map(len, logged.values())))
        print(
            f"lost trial {lost}: epochs by host {hosts}; {len(killed)} processes killed on n2;"
            f" {time.monotonic() - started:.0f} s"
        )
    finally:
        # The node comes back, as after a reboot, for the tests after this one.
        on_host(slurm_hosts, "n2", "slurmd", "-f", str(slurm_hosts / "slurm.conf"), "-N", "n2")
        deadline = time.monotonic() + 120
        while (
            "idle"
            not in subprocess.run(["sinfo", "-h", "-N", "-n", "n2", "-o", "%t"], capture_output=True, text=True).stdout
        ):
            assert time.monotonic() < deadline, "n2 did not come back"
            time.sleep(1)


SERVICE_IP = "10.77.0.111"
"""A second address of n1, where the job's Ray head and MLflow listen in the test whose worker
reaches SLURM on n1 (its first address) but never the Ray head."""


@pytest.mark.parametrize(
    ("head_ip", "message"),
    [
        (HEAD_IP, "the Ray worker on n2 failed to start"),
        (SERVICE_IP, "n2 did not join the Ray cluster within {join_s} s"),
    ],
    ids=["slurm-cannot-start-it", "ray-never-joins"],
)
def test_a_node_that_cannot_reach_the_head_fails_the_job_in_stated_time_naming_it(
    slurm_hosts: Path,
    tmp_path: Path,
    synthetic_workspace: Path,
    head_ip: str,
    message: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """n2's route to the head's address is gone (a blackhole route, as a broken link or a
    firewall). Cut from n1's only address, SLURM cannot start the worker on n2; cut from the
    address the job's servers listen on (``ARTEFACT_HEAD_IP``), the worker starts and never
    joins. Either way the job fails within its join timeout, naming n2."""
    log = tmp_path / "job.log"
    join_s = 30
    monkeypatch.setenv("ARTEFACT_JOIN_TIMEOUT_S", str(join_s))  # sbatch passes the environment on
    monkeypatch.setenv("ARTEFACT_HEAD_IP", head_ip)
    n1, n2 = ["ip", "-n", "artefact-n1"], ["ip", "-n", "artefact-n2"]
    if head_ip == SERVICE_IP:
        subprocess.run([*n1, "addr", "add", f"{SERVICE_IP}/24", "dev", "eth0"], check=True)
    subprocess.run([*n2, "route", "add", "blackhole", f"{head_ip}/32"], check=True)
    try:
        started = time.monotonic()
        job = sbatch(
            log,
            *("--results", str(tmp_path / "results"), "--workspace", str(synthetic_workspace)),
            *("--name", "unjoined", "--trials", "1", "--epochs", "1"),
            resources=TWO_NODES,
        )
        fields = wait_for_job(job, 300)
        seconds = time.monotonic() - started
    finally:
        subprocess.run([*n2, "route", "del", "blackhole", f"{head_ip}/32"], check=True)
        if head_ip == SERVICE_IP:
            subprocess.run([*n1, "addr", "del", f"{SERVICE_IP}/24", "dev", "eth0"], check=True)
    text = log.read_text()
    print(f"n2 cut from {head_ip}: job {fields['JobState']} after {seconds:.0f} s")
    assert fields["JobState"] == "FAILED", text[-3000:]
    assert f"error: {message.format(join_s=join_s)}" in text, text[-3000:]
    assert "Traceback" not in text and "Ray cluster:" not in text
    assert seconds < 120 + join_s  # the job's start-up, then the stated wait at most
    time.sleep(2)
    assert leftover_processes(f"/tmp/ray-{job}/") == []
