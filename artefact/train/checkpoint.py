"""Atomic checkpoint files, loaded with ``weights_only=True``, and an epoch's checkpoint
held in memory until a reporter writes it."""

from __future__ import annotations

import io
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from artefact.errors import UserError

CHECKPOINT_FILE = "checkpoint.pt"
VAL_IMAGES_FILE = "val_confusion_per_image.npy"
"""Beside each checkpoint: the fine head's confusion counts per validation image at that epoch."""
CHECKPOINTS_KEPT = 2
"""Checkpoints Ray keeps per trial (the best by the sweep's metric, and the latest)."""
STATE_COPIES = 3
"""A checkpoint holds the weights and AdamW's two moments, all float32."""


class _ErrorKeepingStream(io.RawIOBase):
    """A file that remembers the OSError of a failed write: torch.save turns a full disk
    into "RuntimeError: enforce fail at inline_container.cc", which names no cause."""

    def __init__(self, file: BinaryIO) -> None:
        self.file = file
        self.error: OSError | None = None

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = error
            raise


def write_atomic(path: Path, write: Callable[[BinaryIO], None], durable: bool = True) -> Path:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``.

    A crash or a full disk leaves the previous file intact, never a half-written one; a
    full disk raises the OSError (ENOSPC) naming ``path``. ``durable=False`` skips the fsync,
    for a file read back at once and then deleted (it cost up to a second per epoch for a
    ConvNeXt-T checkpoint, docs/performance.md).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            stream = _ErrorKeepingStream(file)
            try:
                write(stream)
                file.flush()
                if durable:
                    os.fsync(file.fileno())
            except Exception as error:
                cause = stream.error or (error if isinstance(error, OSError) else None)
                if cause is None:
                    raise
                raise OSError(cause.errno, cause.strerror, str(path)) from None
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def save_checkpoint(state: dict[str, Any], path: Path, durable: bool = True) -> Path:
    return write_atomic(path, lambda stream: torch.save(state, stream), durable)


def copy_atomic(source: Path, path: Path) -> Path:
    with source.open("rb") as original:
        return write_atomic(path, lambda stream: shutil.copyfileobj(original, stream))


class EpochCheckpoint:
    """One epoch's checkpoint before it is written: host copies of the training state, taken
    at once because training goes on changing the originals, and the fine head's confusion
    counts per validation image (for the report's bootstrap over images).

    Writing ConvNeXt-T's 365 MB took 0.5-0.7 s of the CPU and copying the state 0.03 s
    (docs/performance.md), so a reporter that can write it in the background does
    (``send_to_train``); until then it holds host memory the size of the state."""

    def __init__(self, state: dict[str, Any], per_image: np.ndarray) -> None:
        self.state = _host_copy(state)
        self.per_image = per_image

    def write(self, folder: Path) -> Path:
        """``CHECKPOINT_FILE`` and ``VAL_IMAGES_FILE`` in ``folder``, not fsync'd: whoever keeps
        them copies them (Ray into the trial's storage)."""
        save_checkpoint(self.state, folder / CHECKPOINT_FILE, durable=False)
        np.save(folder / VAL_IMAGES_FILE, self.per_image)
        return folder

    @contextmanager
    def written(self) -> Iterator[Path]:
        """Written to a temporary folder, removed afterwards."""
        folder = Path(tempfile.mkdtemp(prefix="artefact-ckpt-"))
        try:
            yield self.write(folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def _host_copy(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):  # a module's state dict keeps its class and version metadata
        copied = type(value)((key, _host_copy(item)) for key, item in value.items())
        if hasattr(value, "_metadata"):
            copied._metadata = value._metadata
        return copied
    if isinstance(value, list | tuple):
        return type(value)(_host_copy(item) for item in value)
    return value


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, ValueError, LookupError) as error:
        raise UserError(f"checkpoint {path} is unreadable or corrupt ({type(error).__name__}: {error}).") from None


def sweep_checkpoint_bytes(parameters: int, trials: int) -> int:
    """Disk a sweep's checkpoints can take at once: each trial's kept ones plus the one being written."""
    return parameters * 4 * STATE_COPIES * (CHECKPOINTS_KEPT + 1) * trials
