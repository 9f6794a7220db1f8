"""Who may use an MLflow server that listens beyond loopback: MLflow's basic-auth app with
one admin user, whose password the SLURM job generates into a mode-700 folder of its own.
The sweep and its trials send it from ``MLFLOW_TRACKING_USERNAME`` and
``MLFLOW_TRACKING_PASSWORD`` (MLflow's client reads them), so it is never on a command
line, in a config or in a log. Nothing here imports mlflow.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from artefact.errors import UserError

AUTH_USER = "artefact"
PASSWORD_FILE = "password"
CONFIG_FILE = "auth.ini"
USERS_DB = "users.db"
MIN_PASSWORD_LENGTH = 12
CREDENTIAL_CACHE_S = 60
"""How long the server trusts a checked password: without the cache, every request of every
trial pays a PBKDF2 hash (MLflow's default, ``auth_cache_ttl_seconds = 0``)."""


def read_password(folder: Path) -> str:
    """The password in ``folder/password``, refused unless only its owner can read it."""
    path = folder / PASSWORD_FILE
    if not path.is_file():
        raise UserError(
            f"--auth-folder {folder}: no {PASSWORD_FILE} file in it. Write the server's password there"
            f" (mode 600), e.g. (umask 077; openssl rand -hex 24 > {path})."
        )
    for checked in (folder, path):
        if checked.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise UserError(
                f"{checked} can be read by other users; the MLflow server's password must not be."
                f" Fix: chmod {'700' if checked.is_dir() else '600'} {checked}"
            )
    password = path.read_text().strip()
    if len(password) < MIN_PASSWORD_LENGTH or any(character in password for character in "%\n\r"):
        raise UserError(
            f"{path}: give one line of at least {MIN_PASSWORD_LENGTH} characters, without '%' (MLflow's rules),"
            " e.g. openssl rand -hex 24."
        )
    return password


def auth_server_environment(folder: Path) -> dict[str, str]:
    """The variables ``mlflow server --app-name basic-auth`` needs: its config file (written
    here) and a secret key for its CSRF tokens, new at every start (one server per job)."""
    return {
        "MLFLOW_AUTH_CONFIG_PATH": str(write_auth_config(folder)),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32),
    }


def write_auth_config(folder: Path) -> Path:
    """``folder/auth.ini`` for ``mlflow server --app-name basic-auth`` (named by
    ``MLFLOW_AUTH_CONFIG_PATH``), mode 600, with a users database rebuilt at every start: the
    admin password is only read into an empty one, and the admin user is the only user."""
    password = read_password(folder)
    users = folder / USERS_DB
    users.unlink(missing_ok=True)
    config = folder / CONFIG_FILE
    text = "\n".join(
        [
            "[mlflow]",
            "default_permission = NO_PERMISSIONS",
            f"database_uri = sqlite:///{users.resolve()}",
            f"admin_username = {AUTH_USER}",
            f"admin_password = {password}",
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth",
            f"auth_cache_ttl_seconds = {CREDENTIAL_CACHE_S}",
            "",
        ]
    )
    descriptor = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)
    os.chmod(config, 0o600)
    return config
