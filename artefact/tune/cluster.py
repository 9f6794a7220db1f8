"""The Ray cluster a sweep runs on: joined (``--address``) or started here on loopback, with
the environment ``ray_env`` prepared, and stopped while the report is written."""

from __future__ import annotations

import logging
import threading

import ray

from artefact.errors import UserError
from artefact.tracking.vocabulary import TRIAL_CLIENT_ENV
from artefact.tune.ray_env import TRIAL_ENV


def connect(address: str | None, verbose: bool) -> str | None:
    """Join ``address``, or start a local cluster bound to 127.0.0.1; returns the local
    cluster's dashboard URL (None when joining)."""
    quiet = {} if verbose else {"logging_level": logging.WARNING, "log_to_driver": False}
    runtime_env = {"env_vars": {**TRIAL_ENV, **TRIAL_CLIENT_ENV}}
    if address:
        ray.init(address=address, runtime_env=runtime_env, **quiet)
        return None
    context = ray.init(
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        _node_ip_address="127.0.0.1",
        runtime_env=runtime_env,
        **quiet,
    )
    node_address = context.address_info["node_ip_address"]
    if node_address != "127.0.0.1":
        ray.shutdown()
        raise UserError(
            f"the local Ray cluster bound to {node_address} instead of 127.0.0.1; refusing to run a sweep that"
            " other machines could reach. Set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (see artefact/tune/ray_env.py)."
        )
    return f"http://{context.dashboard_url}" if context.dashboard_url else None


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
