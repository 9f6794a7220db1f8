"""The environment of the local Ray clusters a sweep starts: a private token, loopback only.

Ray reads these variables when it is first imported, so this module imports no Ray and
must run before anything that does. Each sweep gets its own token file (mode 600): a
stray ``~/.ray/auth_token`` is never used, and other users cannot attach.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def sweep_token_file(results: Path, sweep: str) -> Path:
    """Outside the sweep folder (whose existence means 'already started'), never logged."""
    return results / ".ray-tokens" / f"{sweep}.token"


LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
"""Measured here: without it, GCS and the raylet listen on every interface even when the
node address is 127.0.0.1 (FACTS.md); with it, every listener stays on loopback."""


def prepare_local_cluster(token_file: Path) -> Path:
    """Create the token file if needed and point this process (and Ray's children) at it."""
    token_file.parent.mkdir(parents=True, exist_ok=True)
    if not token_file.exists():
        descriptor = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(secrets.token_hex(32))
    token_file.chmod(0o600)
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(token_file.resolve())
    os.environ.update(LOOPBACK_ENV)
    return token_file
