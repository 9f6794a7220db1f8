"""The environment of the local Ray clusters a sweep starts: a private token, loopback only,
no idle workers, and the settings Tune and Train read in the trials' processes.

Ray reads the cluster's variables when it is first imported, so this module imports no Ray
and must run before anything that does; Tune and Train read ``TRIAL_ENV`` in the trials'
processes. Each sweep gets its own token file (mode 600): a stray ``~/.ray/auth_token`` is
never used, and other users cannot attach.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path

from artefact.errors import UserError


def sweep_token_file(results: Path, sweep: str) -> Path:
    """Outside the sweep folder (whose existence means 'already started'), never logged."""
    return results / ".ray-tokens" / f"{sweep}.token"


LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
"""Measured here: without it, GCS and the raylet listen on every interface even when the
node address is 127.0.0.1 (FACTS.md); with it, every listener stays on loopback."""


NO_IDLE_WORKERS_ENV = {"RAY_enable_worker_prestart": "0", "RAY_prestart_worker_first_driver": "0"}
"""Ray starts an idle Python worker per CPU ahead of time, but Tune's trials and Train's
workers each carry a runtime env, so Ray starts new processes for them: the idle ones are
never used. Measured here: a 2-CPU sweep's two took 0.6 s of CPU each while the sweep
started, and Ray stopped them a few seconds later; beside one trial on an 8-CPU cluster,
two stayed for the whole run, with 84 MB of memory and 1.7% of a core."""


TRIAL_ENV = {
    # Train V2 polls worker health every 2 s by default; on short trials that polling
    # dominates start-up (measured on 2 cores: ~19 s -> ~12 s per trial).
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    # A trial stopped inside its report still logs its best epoch's figures (1-3 s) before its
    # process takes the next trial; Tune waits 2 s by default, then starts a new process.
    "TUNE_FUNCTION_THREAD_TIMEOUT_S": "30",
    # Train starts a preemption watcher actor per run, for nodes that Ray's autoscaler drains
    # (cloud spot instances). These clusters have no autoscaler; on SLURM the job's time
    # limit is announced by USR1, on which the sweep saves its state. Measured here: the
    # watcher's process took 1.0-1.1% of a core during a Ray Train epoch, and 2.1-2.7 s of
    # CPU over a 75-85 s run.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    # The dashboard's Train view lists a run (and its workers) only with Train's state actor on.
    "RAY_TRAIN_ENABLE_STATE_TRACKING": "1",
}
"""Read by Tune and Train in the processes of a sweep's trials. ``prepare_local_cluster`` sets
it for the clusters started here (the benchmark's too); a sweep also passes it as its job's
runtime env, which is what reaches a cluster it joins (``--address``, SLURM)."""


DRIVER_ENV = {
    # Tune saves a sweep's state every 10 s or more by default; a trial that ends inside that
    # window is re-run after a kill and --resume. Saving each second keeps the window short.
    "TUNE_GLOBAL_CHECKPOINT_S": "1",
}
"""Read by Tune in the sweep's own process; the entry point sets it (a value already in the
environment wins)."""


def prepare_local_cluster(token_file: Path) -> Path:
    """Create the token file if needed and point this process (and Ray's children) at it, with
    the settings above."""
    try:
        token_file.parent.mkdir(parents=True, exist_ok=True)
        if not token_file.exists():
            _write_token(token_file)
        token_file.chmod(0o600)
    except OSError as error:
        raise UserError(
            f"cannot write the sweep's Ray token file {token_file} ({error.strerror}); free some space or fix"
            " the permissions of --results, or pass another --results."
        ) from None
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(token_file.resolve())
    os.environ.update(LOOPBACK_ENV)
    os.environ.update(NO_IDLE_WORKERS_ENV)
    os.environ.update(TRIAL_ENV)
    return token_file


def _write_token(token_file: Path) -> None:
    """A new token, whole or not at all: an empty token file left by a full disk would
    otherwise be taken as the token by the next run."""
    handle, temporary = tempfile.mkstemp(dir=token_file.parent, prefix=".token.")  # mode 600
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(secrets.token_hex(32))
            stream.flush()
            os.fsync(stream.fileno())
        os.link(temporary, token_file)  # fails if another process made one meanwhile; theirs is kept
    except FileExistsError:
        pass
    finally:
        Path(temporary).unlink(missing_ok=True)
