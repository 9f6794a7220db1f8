"""A full or read-only output disk: a clear error, and nothing half-written.

The disks are real: small tmpfs mounts (filled up, or mounted read-only), so the errors are
the kernel's own ENOSPC and EROFS. Mounting needs root, as on the build machines.
"""

from __future__ import annotations

import errno
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from sweep_helpers import import_script

from artefact.cli import run_cli
from artefact.train.checkpoint import load_checkpoint, save_checkpoint

encoder_bench = import_script("encoder_bench")


def _mount(folder: Path, *options: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(folder)], capture_output=True)
    if done.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs at {folder} (the disk tests need root): {done.stderr.decode().strip()}")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MB filesystem."""
    folder = tmp_path / "small-disk"
    _mount(folder, "size=2m")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=True)


@pytest.fixture
def read_only_disk(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "read-only-disk"
    _mount(folder, "size=1m", "ro")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=True)


def _fill(disk: Path) -> None:
    """Write until the kernel says the disk is full."""
    with (disk / "filler").open("wb") as stream:
        try:
            while True:
                stream.write(b"\0" * 65536)
                stream.flush()
        except OSError as error:
            assert error.errno == errno.ENOSPC


def _state(size: int) -> dict:
    return {"model": {"w": torch.zeros(size)}, "epoch": 1}


def test_a_checkpoint_that_no_longer_fits_keeps_the_previous_one_whole(small_disk: Path, fault_survived) -> None:
    path = save_checkpoint(_state(10), small_disk / "checkpoint.pt")
    before = path.read_bytes()
    with pytest.raises(OSError) as raised:
        save_checkpoint(_state(1_000_000), path)  # 4 MB on a 2 MB disk
    assert raised.value.errno == errno.ENOSPC
    assert path.read_bytes() == before and load_checkpoint(path)["epoch"] == 1
    assert sorted(p.name for p in small_disk.iterdir()) == ["checkpoint.pt"]  # no temporary file left
    fault_survived("disk full while a checkpoint is written")


def _sweep(tmp_path: Path, results: Path, capsys) -> tuple[int, str]:
    store = tmp_path / "mlflow.db"
    argv = ["--results", str(results), "--workspace", str(tmp_path / "ws"), "--tracking-uri", f"sqlite:///{store}"]
    code = encoder_bench.main([*argv, "--name", "out-of-room"])
    return code, capsys.readouterr().err


def test_a_sweep_on_a_disk_too_small_for_its_checkpoints_stops_before_training(
    tmp_path: Path, small_disk: Path, capsys
) -> None:
    code, err = _sweep(tmp_path, small_disk / "results", capsys)
    assert code == 2, err
    message = re.search(r"MB free, but the sweep's checkpoints need about ([0-9.]+) MB", err)
    assert f"--results {small_disk / 'results'}: 2.0 MB free" in err and message, err
    assert float(message.group(1)) > 2.0
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (small_disk / "results" / "out-of-room").exists()
    assert not (tmp_path / "ws").exists()  # no data prepared either


def test_a_sweep_on_a_full_disk_names_the_first_file_it_could_not_write(
    tmp_path: Path, small_disk: Path, capsys, fault_survived
) -> None:
    _fill(small_disk)
    code, err = _sweep(tmp_path, small_disk / "results", capsys)
    assert code == 2, err
    token = small_disk / "results" / ".ray-tokens" / "out-of-room.token"
    assert f"cannot write the sweep's Ray token file {token} (No space left on device)" in err
    assert not token.exists()  # not an empty token that a later run would trust
    assert [p.name for p in token.parent.iterdir()] == []
    fault_survived("results disk full at start")


def test_a_sweep_into_a_read_only_folder_stops_before_training(
    tmp_path: Path, read_only_disk: Path, capsys, fault_survived
) -> None:
    code, err = _sweep(tmp_path, read_only_disk / "results", capsys)
    assert code == 2
    token = read_only_disk / "results" / ".ray-tokens" / "out-of-room.token"
    assert f"cannot write the sweep's Ray token file {token} (Read-only file system)" in err
    assert "Traceback" not in err
    fault_survived("results folder read-only")


def test_a_disk_that_fills_mid_run_is_one_clear_line(small_disk: Path, capsys) -> None:
    """Whatever command meets ENOSPC later on (a sweep's leaderboard, a prepared cache) says
    which file it could not write, and exits 2, not with a traceback."""
    _fill(small_disk)
    target = small_disk / "leaderboard.csv"
    code = run_cli(lambda: target.write_bytes(b"rank,encoder\n" * 1000) and 0)
    err = capsys.readouterr().err
    assert code == 2
    assert "error: cannot write the output (No space left on device)" in err
    assert "--resume" in err


def test_other_os_errors_are_not_dressed_up(tmp_path: Path) -> None:
    """Only the disk's errors become one-line messages; a bug still shows its traceback."""
    with pytest.raises(FileNotFoundError):
        run_cli(lambda: (tmp_path / "missing" / "x").read_bytes() and 0)
