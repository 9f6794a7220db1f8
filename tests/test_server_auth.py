"""The MLflow server that asks who you are (``python -m artefact ui --auth-folder``), as a SLURM
job on several nodes serves it: a real server on a non-default loopback address (the path a
head node's own address takes), requests with and without the password, and our own
tracking code logging through it with the credentials from the environment."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from builders import REPO, free_port, run_cli
from mlflow.tracking import MlflowClient

from artefact.errors import UserError
from artefact.tracking.server_auth import AUTH_USER, CONFIG_FILE, PASSWORD_FILE, read_password
from artefact.tracking.store import check_store, open_sweep
from artefact.tracking.trials import TrialRun

PASSWORD = "0123456789abcdef0123456789abcdef"
SEARCH = "/api/2.0/mlflow/experiments/search?max_results=1"


def _auth_folder(parent: Path, password: str = PASSWORD, mode: int = 0o600) -> Path:
    folder = parent / "mlflow-auth"
    folder.mkdir(mode=0o700)
    (folder / PASSWORD_FILE).write_text(password + "\n")
    (folder / PASSWORD_FILE).chmod(mode)
    return folder


def _status(url: str, user: str | None = None, password: str | None = None) -> int:
    request = urllib.request.Request(url)
    if user is not None:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory):
    """(URL, auth folder, server output) of one password-protected server for the module."""
    folder = _auth_folder(tmp_path_factory.mktemp("auth"))
    address, port = "127.0.0.2", free_port()
    log = folder.parent / "server.log"
    with open(log, "w") as output:
        server = subprocess.Popen(
            [sys.executable, "-m", "artefact", "ui", "--host", address, "--port", str(port)]
            + ["--auth-folder", str(folder), "--tracking-uri", f"sqlite:///{folder.parent / 'mlflow.db'}"],
            cwd=REPO,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://{address}:{port}"
    try:
        deadline = time.monotonic() + 120
        while _health(url) != 200:
            assert server.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the MLflow server did not answer in 120 s"
            time.sleep(1)
        yield url, folder, log
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


def _health(url: str) -> int:
    try:
        return _status(f"{url}/health")
    except OSError:
        return 0


@pytest.mark.slow
def test_the_server_refuses_requests_without_the_password_and_serves_the_sweep_with_it(
    auth_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, folder, log = auth_server
    assert _status(url + SEARCH) == 401
    assert _status(url + SEARCH, AUTH_USER, "not-the-password") == 401
    assert _status(url + SEARCH, "admin", PASSWORD) == 401  # MLflow's default admin does not exist
    assert _status(url + SEARCH, AUTH_USER, PASSWORD) == 200

    # Without credentials the sweep stops before training, naming the variables to set.
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    with pytest.raises(UserError, match="refused a request without credentials.*MLFLOW_TRACKING_PASSWORD"):
        check_store(url)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", AUTH_USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-the-password")
    with pytest.raises(UserError, match="refused user 'artefact'"):
        check_store(url)

    # With them (as the SLURM job exports them), a sweep and a trial log through it.
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    check_store(url)
    sweep = open_sweep(url, "auth-sweep", {})
    trial = TrialRun(sweep, "trial-0", {"encoder": "tu-test_convnext"})
    for epoch in (1, 2):
        trial.log_epoch({"epoch": epoch, "val/miou_fine": 0.1 * epoch}, step=epoch)
    assert trial.flush() == []
    history = MlflowClient(url).get_metric_history(trial.run_id, "val/miou_fine")
    assert sorted((m.step, m.value) for m in history) == [(1, 0.1), (2, 0.2)]

    # The password is in the owner's files only, never in the server's output.
    assert (folder / CONFIG_FILE).stat().st_mode & 0o777 == 0o600
    assert PASSWORD not in log.read_text()
    assert "warning: serving MLflow on" not in log.read_text()


@pytest.mark.parametrize(
    ("password", "mode", "expected"),
    [
        (None, 0o600, "no password file in it"),
        (PASSWORD, 0o644, "can be read by other users.*chmod 600"),
        ("short", 0o600, "at least 12 characters"),
        ("50%-off-this-password", 0o600, "without '%'"),
    ],
)
def test_a_bad_password_file_is_refused_before_the_server_starts(
    tmp_path: Path, password: str | None, mode: int, expected: str
) -> None:
    folder = _auth_folder(tmp_path, password or PASSWORD, mode)
    if password is None:
        (folder / PASSWORD_FILE).unlink()
    with pytest.raises(UserError, match=expected):
        read_password(folder)


def test_an_auth_folder_others_can_enter_is_refused_by_the_ui_command(tmp_path: Path) -> None:
    folder = _auth_folder(tmp_path)
    folder.chmod(0o755)
    done = run_cli("ui", "--auth-folder", str(folder), "--port", str(free_port()), timeout=60)
    assert done.returncode == 2
    assert f"{folder} can be read by other users" in done.stderr and f"chmod 700 {folder}" in done.stderr
    assert not (folder / CONFIG_FILE).exists()
