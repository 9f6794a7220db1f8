"""Atomic checkpoint files, loaded with ``weights_only=True``."""

from __future__ import annotations

import os
import pickle
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

from artefact.errors import UserError

CHECKPOINT_FILE = "checkpoint.pt"


def _write_atomic(path: Path, write: Callable[[BinaryIO], None]) -> Path:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``.

    A crash or a full disk leaves the previous file intact, never a half-written one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def save_checkpoint(state: dict[str, Any], path: Path) -> Path:
    return _write_atomic(path, lambda stream: torch.save(state, stream))


def copy_atomic(source: Path, path: Path) -> Path:
    with source.open("rb") as original:
        return _write_atomic(path, lambda stream: shutil.copyfileobj(original, stream))


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, ValueError, LookupError) as error:
        raise UserError(f"checkpoint {path} is unreadable or corrupt ({type(error).__name__}: {error}).") from None
