"""Checkpoint files: atomic writes, weights_only loading, clear errors for corrupt files, and
an epoch's checkpoint taken before it is written."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from artefact.errors import UserError
from artefact.train.checkpoint import (
    CHECKPOINT_FILE,
    VAL_IMAGES_FILE,
    EpochCheckpoint,
    copy_atomic,
    load_checkpoint,
    save_checkpoint,
)

MARKER = "pwned"


class _Payload:
    """Unpickling this runs a command; weights_only loading must refuse it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _state() -> dict:
    return {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "epoch": 4, "best": 0.25, "scaler": {}}


def test_round_trip_and_no_temporary_files(tmp_path: Path) -> None:
    path = save_checkpoint(_state(), tmp_path / "run" / "checkpoint.pt")
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["model"]["w"], _state()["model"]["w"])
    assert loaded["epoch"] == 4 and loaded["best"] == 0.25
    copy = copy_atomic(path, tmp_path / "best" / "checkpoint.pt")
    assert copy.read_bytes() == path.read_bytes()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint.pt"]


def test_a_failed_save_keeps_the_previous_file(tmp_path: Path) -> None:
    path = save_checkpoint(_state(), tmp_path / "checkpoint.pt")
    before = path.read_bytes()
    with pytest.raises(Exception):  # noqa: B017 - whatever torch.save raises for an unpicklable value
        save_checkpoint({"model": lambda: None}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[: len(data) // 2],
        lambda data: data[:100],
        lambda data: b"",
        lambda data: b"hello world",
        lambda data: os.urandom(300),
        lambda data: data[:300] + bytes(200) + data[500:],
    ],
    ids=["half", "head", "empty", "text", "random", "zeroed-block"],
)
def test_corrupt_checkpoint_is_a_user_error_naming_the_file(tmp_path: Path, damage) -> None:
    path = save_checkpoint(_state(), tmp_path / "checkpoint.pt")
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(UserError, match="unreadable or corrupt") as error:
        load_checkpoint(path)
    assert str(path) in str(error.value)


def test_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="nothing-here.pt"):
        load_checkpoint(tmp_path / "nothing-here.pt")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_arbitrary_objects_are_refused_not_executed(tmp_path: Path, writer: str) -> None:
    marker = tmp_path / MARKER
    path = tmp_path / "evil.pt"
    state = {"model": {"w": torch.zeros(1)}, "extra": _Payload(marker)}
    if writer == "pickle":
        path.write_bytes(pickle.dumps(state))
    else:
        torch.save(state, path)
    with pytest.raises(UserError, match="evil.pt"):
        load_checkpoint(path)
    assert not marker.exists(), "the payload ran: the checkpoint was not loaded with weights_only"
    # The same file really is executable with a plain unpickler (the test payload is live).
    if writer == "pickle":
        pickle.loads(path.read_bytes())
        assert marker.exists()


def test_an_epoch_checkpoint_holds_the_state_as_it_was_when_taken(tmp_path: Path) -> None:
    """Written later (in Ray Train's upload thread), it holds the state of its epoch, not
    that of the steps trained since, and a module's state dict keeps its version metadata."""
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 1, 4, 4)).sum().backward()
    optimizer.step()
    taken = {name: value.clone() for name, value in model.state_dict().items()}
    checkpoint = EpochCheckpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, np.zeros(3))
    model(torch.randn(2, 1, 4, 4)).sum().backward()
    optimizer.step()  # training goes on, in place

    state = load_checkpoint(checkpoint.write(tmp_path) / CHECKPOINT_FILE)
    assert all(torch.equal(state["model"][name], value) for name, value in taken.items())
    assert not torch.equal(state["model"]["0.weight"], model.state_dict()["0.weight"])
    assert state["model"]._metadata["1"]["version"] == model.state_dict()._metadata["1"]["version"]
    assert np.load(tmp_path / VAL_IMAGES_FILE).tolist() == [0.0, 0.0, 0.0]
