"""The Ray cluster a sweep runs on: joined (``--address``) or started here on loopback, with
the environment ``ray_env`` prepared, and stopped while the report is written."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import ray

from artefact.errors import UserError
from artefact.tracking.vocabulary import TRIAL_CLIENT_ENV
from artefact.tune.ray_env import TRIAL_ENV

DASHBOARD_PORT = 8265
"""Ray's default; a sweep takes a port the system picks when another cluster holds it."""


def connect(address: str | None, verbose: bool) -> str | None:
    """Join ``address``, or start a local cluster bound to 127.0.0.1; returns the local
    cluster's dashboard URL (None when joining).

    The trials' processes are told which cluster is theirs (``RAY_ADDRESS``, or for a local
    cluster its dashboard's address): Ray Train's placement-group cleaner asks Ray's state
    API, which otherwise refuses to choose when a machine runs several clusters (two users'
    sweeps, or a SLURM node shared by two jobs), and a stopped trial's CPUs then stay held.
    """
    quiet = {} if verbose else {"logging_level": logging.WARNING, "log_to_driver": False}
    env_vars = {**TRIAL_ENV, **TRIAL_CLIENT_ENV}
    if address:
        ray.init(address=address, runtime_env={"env_vars": {**env_vars, "RAY_ADDRESS": address}}, **quiet)
        return None
    for attempt in range(3):
        with _port_choice_lock():  # two sweeps started at once would choose the same free port
            port = _free_port(DASHBOARD_PORT if attempt == 0 else 0)
            try:
                context = ray.init(
                    include_dashboard=True,
                    dashboard_host="127.0.0.1",
                    dashboard_port=port,
                    _node_ip_address="127.0.0.1",
                    runtime_env={"env_vars": {**env_vars, "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}},
                    **quiet,
                )
                break
            except Exception as error:  # Ray raises a bare Exception when another program took the port
                if "port for dashboard" not in str(error) or attempt == 2:
                    raise
    node_address = context.address_info["node_ip_address"]
    if node_address != "127.0.0.1":
        ray.shutdown()
        raise UserError(
            f"the local Ray cluster bound to {node_address} instead of 127.0.0.1; refusing to run a sweep that"
            " other machines could reach. Set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (see artefact/tune/ray_env.py)."
        )
    return f"http://{context.dashboard_url}" if context.dashboard_url else None


@contextlib.contextmanager
def _port_choice_lock() -> Iterator[None]:
    """Held from choosing the dashboard's port until Ray has bound it (Ray does not retry an
    explicit port), by every sweep of this user on this machine."""
    # One per user: another user's file in /tmp cannot be opened with O_CREAT (protected_regular).
    lock = Path(tempfile.gettempdir()) / f"artefact-dashboard-port-{os.getuid()}.lock"
    descriptor = os.open(lock, os.O_RDONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


def _free_port(preferred: int) -> int:
    """``preferred`` if nothing listens there on loopback, else a port the system picks."""
    for candidate in (preferred, 0):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", candidate))
            except OSError:
                continue
            return probe.getsockname()[1]
    raise UserError("no free TCP port on 127.0.0.1 for the Ray dashboard.")


def resources() -> dict[str, float]:
    """The connected cluster's CPUs and GPUs."""
    return ray.cluster_resources()


def stop_meanwhile() -> threading.Thread:
    """Stop Ray while the leaderboard and figures are written, which need no Ray: its
    shutdown mostly waits for processes to exit (docs/performance.md)."""
    stopping = threading.Thread(target=ray.shutdown, name="ray-shutdown")
    stopping.start()
    return stopping


def stop(stopping: threading.Thread | None) -> None:
    """Wait for ``stop_meanwhile``; stop Ray directly if it was not started or its thread failed."""
    if stopping is not None:
        stopping.join()
    if ray.is_initialized():
        ray.shutdown()
