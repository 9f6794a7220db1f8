"""The SLURM scripts in cluster/, on a real one-node SLURM cluster started for this session
(munged, slurmctld and slurmd from Debian; tests/slurm_cluster.sh) with a fake GPU."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient
from sweep_helpers import REPO

from artefact.config_files import PROFILES

pytestmark = pytest.mark.slow

CLUSTER = REPO / "cluster"
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED"}


@pytest.fixture(scope="session")
def slurm(tmp_path_factory: pytest.TempPathFactory):
    """A running one-node cluster; SLURM_CONF points every client (and job) at it."""
    folder = tmp_path_factory.mktemp("slurm")
    script = REPO / "tests" / "slurm_cluster.sh"
    started = subprocess.run([str(script), "start", str(folder)], capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stdout + started.stderr
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(folder / "slurm.conf")
    yield folder
    subprocess.run([str(script), "stop", str(folder)], check=True, timeout=60)
    if previous is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = previous


def job_fields(job: str) -> dict[str, str]:
    shown = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True, check=True)
    return dict(re.findall(r"(\w+)=(\S*)", shown.stdout))


REQUEUE_DELAY_S = 5
"""slurmd revokes a requeued job's credential with one-second resolution, so a new start in
the same second fails ("Job credential revoked", seen in CI); SLURM's own delay is 2 minutes."""


def wait_for_job(job: str, timeout: float, until=lambda fields: fields["JobState"] in FINISHED) -> dict[str, str]:
    """Poll scontrol (sbatch --wait polls slowly); a requeued job is made eligible after
    ``REQUEUE_DELAY_S`` instead of SLURM's two-minute requeue delay."""
    deadline = time.monotonic() + timeout
    requeued_at = None
    while True:
        fields = job_fields(job)
        if until(fields):
            return fields
        if fields["JobState"] == "PENDING" and fields.get("Reason") == "BeginTime":
            requeued_at = requeued_at or time.monotonic()
            if time.monotonic() - requeued_at >= REQUEUE_DELAY_S:
                subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
        assert time.monotonic() < deadline, f"job {job} still {fields['JobState']} after {timeout} s"
        time.sleep(2)


def sbatch(log: Path, *args: str, resources: tuple[str, ...] = ("--cpus-per-task=1", "--mem=2G")) -> str:
    script = str(CLUSTER / "sweep.sbatch")
    submitted = subprocess.run(
        ["sbatch", "--parsable", f"--chdir={REPO}", f"--output={log}", *resources, script, *args],
        capture_output=True,
        text=True,
        check=True,
    )
    return submitted.stdout.strip().split(";")[0]


def leftover_processes(*markers: str) -> list[str]:
    """Processes whose command line names any marker (a job's Ray folder, its MLflow port...)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        line = " ".join(process.info["cmdline"] or [])
        if any(marker in line for marker in markers):
            found.append(line[:200])
    return found


def trial_epochs(store: Path, sweep: str) -> dict[str, list[int]]:
    """Each trial run's logged val/miou_fine steps, read back from the sweep's MLflow store
    (empty until the sweep has created its experiment)."""
    client = MlflowClient(f"sqlite:///{store}")
    experiment = client.get_experiment_by_name(sweep)
    if experiment is None:  # the job has not got that far yet
        return {}
    runs = client.search_runs([experiment.experiment_id], "tags.`artefact.role` = 'trial'", max_results=100)
    history = client.get_metric_history
    return {
        run.data.tags["artefact.trial_id"]: sorted(m.step for m in history(run.info.run_id, "val/miou_fine"))
        for run in runs
    }


def small_profile(folder: Path) -> Path:
    """cpu-smoke for a 1-CPU node, so two jobs fit the 2-core test machine at once."""
    text = (PROFILES / "cpu-smoke.yaml").read_text().replace("node_cpus: 2", "node_cpus: 1")
    text = text.replace("node_memory_gb: 8", "node_memory_gb: 2")
    path = folder / "one-cpu.yaml"
    path.write_text(text)
    return path


@pytest.mark.slurm
def test_requeued_job_resumes_its_sweep_while_a_second_job_runs_beside_it(
    slurm, tmp_path: Path, synthetic_workspace: Path
) -> None:
    results = tmp_path / "results"
    common = ("--results", str(results), "--workspace", str(synthetic_workspace), "--set", "sweep.scheduler=none")
    first = sbatch(tmp_path / "first.log", *common, "--name", "first", "--trials", "2", "--epochs", "1")

    # The second job goes through the submit helper, which sizes it from the profile.
    submitted = subprocess.run(
        [str(CLUSTER / "submit.sh"), "--profile", str(small_profile(tmp_path)), "--time", "00:20:00"]
        + ["--log", str(tmp_path / "second-%j.log"), "--", *common, "--name", "second", "--trials", "1"]
        + ["--epochs", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert submitted.returncode == 0, submitted.stderr
    second = re.search(r"submitted job (\d+): (.*) x 1 node", submitted.stdout)
    assert second, submitted.stdout
    assert "--cpus-per-task=1" in second.group(2) and "--mem=2G" in second.group(2)
    assert re.search(r"Ray dashboard: ssh -N -L (\d+):127\.0\.0\.1:\1 ", submitted.stdout), submitted.stdout
    second = second.group(1)
    assert job_fields(second)["Partition"] == "test"

    # Once the first job has finished a trial, SLURM's time-limit warning (USR1) arrives. The
    # store is read only once the sweep runs: opening it while the server creates it races.
    store = results / ".slurm" / "first" / "mlflow.db"
    log = tmp_path / "first.log"
    deadline = time.monotonic() + 420
    while (
        not log.exists()
        or "Ray cluster:" not in log.read_text()
        or not any(steps == [1] for steps in trial_epochs(store, "first").values())
    ):
        assert job_fields(first)["JobState"] in ("PENDING", "RUNNING"), log.read_text()[-3000:]
        assert time.monotonic() < deadline, "no trial of the first job finished in time"
        time.sleep(3)
    subprocess.run(["scancel", "--signal=USR1", "--batch", first], check=True)

    first_fields = wait_for_job(first, 600)
    second_fields = wait_for_job(second, 300)
    first_log = (tmp_path / "first.log").read_text()
    second_log = next(tmp_path.glob("second-*.log")).read_text()
    assert first_fields["JobState"] == "COMPLETED", first_log[-3000:]
    assert second_fields["JobState"] == "COMPLETED", second_log[-3000:]
    assert first_fields["Restarts"] == "1", first_fields
    assert "requeueing job" in first_log and "(restart 1)" in first_log

    # Exactly the requested trials, each epoch logged once, in the MLflow server's store.
    epochs = trial_epochs(store, "first")
    assert len(epochs) == 2 and all(steps == [1] for steps in epochs.values()), epochs
    assert list(trial_epochs(results / ".slurm" / "second" / "mlflow.db", "second").values()) == [[1]]
    client = MlflowClient(f"sqlite:///{store}")
    parent = client.search_runs(
        [client.get_experiment_by_name("first").experiment_id], "tags.`artefact.role` = 'sweep'"
    )
    assert [run.info.status for run in parent] == ["FINISHED"]

    # Ray saw the allocation (1 CPU), not the 2-core machine; the jobs used different ports.
    assert "Ray cluster: 1 CPUs, 0 GPUs" in first_log and "Ray cluster: 1 CPUs, 0 GPUs" in second_log
    ports = [re.search(r"Ray dashboard: ssh -N -L (\d+):", log).group(1) for log in (first_log, second_log)]
    assert ports[0] != ports[1]
    mlflow_ports = [re.search(r"MLflow UI: ssh -N -L (\d+):", log).group(1) for log in (first_log, second_log)]
    token = results / ".slurm" / "first" / "ray.token"
    assert token.stat().st_mode & 0o777 == 0o600
    assert token.read_text().strip() not in first_log

    # Nothing of either job is left running.
    time.sleep(2)
    markers = [f"/tmp/ray-{first}/", f"/tmp/ray-{second}/", *(f"--port {p}" for p in mlflow_ports)]
    assert leftover_processes(*markers) == []


@pytest.mark.slurm
def test_a_hard_requeue_terms_the_job_and_its_next_start_resumes_the_sweep(
    slurm, tmp_path: Path, synthetic_workspace: Path
) -> None:
    """``scontrol requeue`` (as a preemption or an admin does) sends SIGTERM to everything in
    the job, with no USR1 first, and kills what is left 30 s later (KillWait): the job's next
    start resumes the sweep from its saved state, every requested trial accounted for and no
    epoch logged twice."""
    results = tmp_path / "results"
    log = tmp_path / "job.log"
    args = ("--results", str(results), "--workspace", str(synthetic_workspace), "--set", "sweep.scheduler=none")
    job = sbatch(log, *args, "--name", "termed", "--trials", "2", "--epochs", "1")
    store = results / ".slurm" / "termed" / "mlflow.db"
    deadline = time.monotonic() + 420
    while (
        not log.exists()
        or "Ray cluster:" not in log.read_text()
        or not any(steps == [1] for steps in trial_epochs(store, "termed").values())
    ):
        assert job_fields(job)["JobState"] in ("PENDING", "RUNNING"), log.read_text()[-3000:] if log.exists() else ""
        assert time.monotonic() < deadline, "no trial finished in time"
        time.sleep(3)
    subprocess.run(["scontrol", "requeue", job], check=True)

    fields = wait_for_job(job, 600)
    text = log.read_text()
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "1", text[-3000:]
    first_run, second_run = text.split("(restart 1)", 1)
    assert "stopped by SIGTERM: the sweep saves its state" in first_run, first_run[-3000:]
    # Every requested trial is accounted for. Ray's processes die on the same TERM, so Tune's
    # state may predate the TERM: a trial it lacks runs again, and one it lacks that had
    # started is named as replaced. No epoch of any run is logged twice.
    assert "trials: {'completed': 2, 'stopped_early': 0, 'failed': 0}" in second_run, second_run[-3000:]
    epochs = trial_epochs(store, "termed")
    assert all(steps in ([], [1]) for steps in epochs.values()), epochs
    replaced = re.findall(r"replaced (\w+): it started just before", second_run)
    assert len(epochs) == 2 + len(replaced), (epochs, replaced)
    time.sleep(2)
    assert leftover_processes(f"/tmp/ray-{job}/") == []


@pytest.mark.slurm
@pytest.mark.parametrize(
    ("arguments", "resources", "message"),
    [
        (("--profile", "no-such-profile"), (), "--profile 'no-such-profile' is unknown"),
        (
            ("--set", "resources.gpus_per_worker=1", "--set", "resources.workers_per_trial=2")
            + ("--set", "resources.trainer=ray_train"),
            ("--gres=gpu:1",),
            "but the cluster has 1 CPUs and 1 GPUs",
        ),
        (("--address", "10.0.0.1:6379"), (), "do not pass --address"),
    ],
    ids=["missing-profile", "more-gpus-than-allocated", "address-given"],
)
def test_bad_input_fails_the_job_with_a_clear_message(
    slurm, tmp_path: Path, synthetic_workspace: Path, arguments, resources, message
) -> None:
    log = tmp_path / "job.log"
    args = ("--results", str(tmp_path / "results"), "--workspace", str(synthetic_workspace), "--name", "bad")
    args += arguments
    job = sbatch(log, *args, resources=("--cpus-per-task=1", "--mem=2G", *resources))
    fields = wait_for_job(job, 240)
    text = log.read_text()
    assert fields["JobState"] == "FAILED", text[-3000:]
    assert message in text, text[-3000:]
    assert "Traceback" not in text
    assert leftover_processes(f"/tmp/ray-{job}/") == []


@pytest.mark.slurm
def test_submit_refuses_a_torch_build_without_the_profile_gpus_before_queueing(slurm, tmp_path: Path) -> None:
    """A wrong CUDA build fails on the login node, not after hours in the queue (sm_37: no
    build of this torch has Kepler kernels)."""
    profile = small_profile(tmp_path)
    profile.write_text(profile.read_text().replace("resources:\n", "resources:\n  gpu_arch: sm_37\n", 1))
    queued_before = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=True).stdout
    submitted = subprocess.run(
        [str(CLUSTER / "submit.sh"), "--profile", str(profile), "--", "--results", str(tmp_path / "results")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert submitted.returncode != 0
    assert "error: resources.gpu_arch of this profile is sm_37, but this torch" in submitted.stderr
    assert "make install TORCH=cu126" in submitted.stderr and "submitted job" not in submitted.stdout
    assert subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout == queued_before


@pytest.mark.slurm
def test_config_values_never_reach_a_shell(slurm, tmp_path: Path, synthetic_workspace: Path) -> None:
    """Values with command substitutions, backticks and ';' travel as data through sbatch,
    sweep.sbatch and the sweep's own check: refused as bad values, never run."""
    canary = tmp_path / "canary"
    hostile = f"$(touch {canary})`touch {canary}`;touch {canary}"
    log = tmp_path / "job.log"
    results = tmp_path / f"results {hostile}"
    job = sbatch(log, "--results", str(results), "--workspace", str(synthetic_workspace), "--encoders", hostile)
    fields = wait_for_job(job, 240)
    text = log.read_text()
    assert fields["JobState"] == "FAILED", text[-3000:]
    assert f"model.encoder = {hostile!r} is neither a timm model nor an SMP encoder" in text, text[-3000:]
    assert not canary.exists()


@pytest.mark.xdist_group("slurm")
def test_a_worker_joins_the_head_with_the_token_on_its_own_ports(tmp_path: Path) -> None:
    """The multi-node path on one host: node 0 (head) and node 1 (worker) of one job. In the
    SLURM tests' group: beside the two-host tests' Ray nodes, its worker once took over 120 s
    to join on 2 cores."""
    token = tmp_path / "ray.token"
    token.write_text("f" * 64)
    token.chmod(0o600)
    base = {**os.environ, "ARTEFACT_JOB_ID": "777", "RAY_AUTH_TOKEN_PATH": str(token), "SLURM_CPUS_ON_NODE": "1"}
    base.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    script = str(CLUSTER / "ray_node.sh")
    # Short folders, as the job uses: Ray's socket paths must stay under 107 bytes.
    folders = [Path(f"/tmp/ray-t{os.getpid()}-{node}") for node in (0, 1)]

    def start(role: str, node: int) -> subprocess.Popen:
        environment = {**base, "SLURM_NODEID": str(node), "RAY_TMPDIR": str(folders[node])}
        return subprocess.Popen(
            [script, role, "127.0.0.1"],
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

    missing = subprocess.run(
        [script, "worker", "127.0.0.1"],
        env={**base, "RAY_AUTH_TOKEN_PATH": str(tmp_path / "gone.token"), "RAY_TMPDIR": str(tmp_path / "x")},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert missing.returncode == 2
    assert f"the token file {tmp_path / 'gone.token'} is missing" in missing.stderr

    base_port = 20000 + 777 * 20  # cluster/common.sh: job 777's block of 20 ports
    nodes = [start("head", 0)]
    try:
        count = (
            f"import json, ray; ray.init(address='127.0.0.1:{base_port}', logging_level='ERROR');"
            "print(json.dumps(sorted(n['NodeManagerPort'] for n in ray.nodes() if n['Alive'])))"
        )
        with_token = {**base, "RAY_AUTH_MODE": "token"}
        deadline = time.monotonic() + 120
        nodes.append(None)
        while True:
            assert nodes[0].poll() is None, nodes[0].stdout.read()
            probe = subprocess.run(
                [sys.executable, "-c", count], env=with_token, capture_output=True, text=True, timeout=120
            )
            if probe.returncode == 0 and nodes[1] is None:
                nodes[1] = start("worker", 1)
            if probe.returncode == 0 and len(json.loads(probe.stdout.strip().splitlines()[-1])) == 2:
                break
            assert time.monotonic() < deadline, f"nodes alive: {probe.stdout[-200:]} {probe.stderr[-2000:]}"
            time.sleep(2)
        # Node 0 and node 1 of the job each take their own set of ports from the job's block.
        assert json.loads(probe.stdout.strip().splitlines()[-1]) == [base_port + 4, base_port + 12]

        without_token = {k: v for k, v in base.items() if not k.startswith("RAY_AUTH")}
        refused = subprocess.run(
            [sys.executable, "-c", count], env=without_token, capture_output=True, text=True, timeout=120
        )
        assert refused.returncode != 0
    finally:
        for node in nodes:
            if node is not None:
                os.killpg(node.pid, 15)
                node.wait(timeout=60)
    assert leftover_processes(*map(str, folders)) == []
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.shellcheck
def test_cluster_scripts_pass_shellcheck() -> None:
    scripts = [*CLUSTER.glob("*.sh"), *CLUSTER.glob("*.sbatch"), *(REPO / "tests").glob("*.sh")]
    assert len(scripts) >= 5
    checked = subprocess.run(["shellcheck", "-x", *map(str, scripts)], cwd=REPO)
    assert checked.returncode == 0
