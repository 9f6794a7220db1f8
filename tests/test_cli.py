"""``python -m artefact``: the happy paths, and config/model errors that fail fast and leave nothing."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from builders import REPO, free_port, run_cli

from artefact.data.cache import read_index


def test_synth_then_prepare_then_reuse(tmp_path: Path) -> None:
    made = run_cli("synth", "--out", str(tmp_path / "raw"), "--count", "12", "--layout", "parquet", "--seed", "2")
    assert made.returncode == 0, made.stderr
    assert list((tmp_path / "raw" / "data").glob("train-*.parquet"))

    args = ("prepare", "--source", str(tmp_path / "raw"), "--out", str(tmp_path / "cache"))
    first = run_cli(*args, "--max-side", "64", "--augment-copies", "1", "--split-seed", "5")
    assert first.returncode == 0, first.stderr
    assert "prepared" in first.stdout
    index = read_index(tmp_path / "cache")
    train_ids = [r["id"] for r in index if r["split"] == "train" and "." not in r["id"]]
    assert len(index) == 12 + len(train_ids)
    assert all(f"{i}.hflip" in {r["id"] for r in index} for i in train_ids)
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["params"]["max_side"] == 64 and manifest["params"]["split_seed"] == 5

    again = run_cli(*args, "--max-side", "64", "--augment-copies", "1", "--split-seed", "5")
    assert again.returncode == 0 and "reusing" in again.stdout


def _python_tag_config(tmp_path: Path) -> list[str]:
    path = tmp_path / "evil.yaml"
    path.write_text(f"train: !!python/object/apply:os.system ['touch {tmp_path / 'ran'}']\n")
    return ["--config", str(path)]


TRAIN_ERRORS = {
    "unknown-key": (["train.epoch=3"], r"unknown config key train\.epoch\. Did you mean epochs\?"),
    "python-tag": (_python_tag_config, r"evil\.yaml: not valid safe YAML"),
    "unknown-encoder": (
        ["model.encoder=convnext_tinny"],
        r"'convnext_tinny' is neither a timm model nor an SMP encoder\. Close matches: ",
    ),
    "resolution-48": (["data.resolution=48"], r"data\.resolution = 48 is invalid: expected a positive multiple of 32"),
    "upernet-batch-1": (["model.arch=upernet", "train.batch_size=1"], r"train\.batch_size = 1 is invalid"),
    "negative-weight": (["loss.coarse=-0.3"], r"loss\.coarse = -0\.3 is invalid"),
    "zero-weights": (["loss.binary=0", "loss.coarse=0", "loss.fine=0"], r"sum over the model's heads is > 0"),
    "missing-weights-file": (["model.pretrained=/no/such/weights.pth"], r"no such weights file"),
    "resume-without-checkpoint": (["--resume"], r"--resume: no checkpoint at .*latest/checkpoint\.pt"),
    "missing-data": (["data.path=/no/such/data"], r"data source /no/such/data does not exist"),
}


@pytest.mark.parametrize("name", list(TRAIN_ERRORS))
def test_train_errors_are_one_line_and_leave_nothing(tmp_path: Path, name: str) -> None:
    args, message = TRAIN_ERRORS[name]
    args = args(tmp_path) if callable(args) else args
    out, workspace = tmp_path / "out", tmp_path / "workspace"
    result = run_cli("train", "--out", str(out), "--workspace", str(workspace), *args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: "), result.stderr
    if name != "python-tag":  # PyYAML's message points at the offending column on extra lines
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert re.search(message, result.stderr), result.stderr
    if "Close matches" in message:
        assert "convnext_tiny" in result.stderr
    assert not out.exists(), "a failed start must not leave an output folder"
    assert not workspace.exists(), "nor prepare data before the config is known to be good"
    assert not (tmp_path / "ran").exists()


def test_train_fails_fast_on_a_config_error(tmp_path: Path) -> None:
    """A typo is reported before torch and the models are even imported."""
    code = (
        "import sys; from artefact.cli import main; "
        f"rc = main(['train', '--out', {str(tmp_path / 'o')!r}, 'train.epoch=1']); "
        "print(rc, 'torch' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.stdout.split() == ["2", "False"], result.stdout + result.stderr
    assert "Did you mean epochs?" in result.stderr


@pytest.mark.slow
def test_train_once_through_the_cli(tmp_path: Path, synthetic_workspace: Path, synthetic_cache: Path) -> None:
    out = tmp_path / "run"
    result = run_cli(
        "train",
        "--out",
        str(out),
        "--workspace",
        str(synthetic_workspace),
        "model.heads=[fine]",
        "data.crops_per_image=1",
        "train.epochs=1",
        "train.steps_per_epoch=2",
        "train.device=cpu",
    )
    assert result.returncode == 0, result.stderr
    assert "epoch 1:" in result.stdout and "done: val/miou_fine" in result.stdout
    assert "generating" not in result.stdout and "prepared" not in result.stdout, "the session cache is reused"
    assert (out / "latest" / "checkpoint.pt").is_file() and (out / "best" / "checkpoint.pt").is_file()
    assert "heads:\n  - fine" in (out / "config.yaml").read_text()


def test_allocation_flags_come_from_the_profile_node() -> None:
    v100 = run_cli("allocation", "--profile", "v100s-x2")
    assert v100.returncode == 0, v100.stderr
    assert v100.stdout.split() == ["--ntasks-per-node=1", "--cpus-per-task=16", "--mem=96G", "--gres=gpu:2"]
    smoke = run_cli("allocation", "--profile", "cpu-smoke")
    assert smoke.stdout.split() == ["--ntasks-per-node=1", "--cpus-per-task=2", "--mem=8G"]
    missing = run_cli("allocation", "--profile", "v100s-x3")
    assert missing.returncode == 2 and "--profile 'v100s-x3' is unknown" in missing.stderr


@pytest.mark.slow
def test_ui_beyond_loopback_warns_and_answers_requests_addressed_to_it(tmp_path: Path) -> None:
    """A multi-node SLURM job serves MLflow on the head's address; MLflow itself answers 403
    to Host headers it was not told about, so the UI passes its own address along."""
    import time
    import urllib.error
    import urllib.request

    # Another loopback address: the same path as a head node's own address (anything but
    # 127.0.0.1 and localhost), while no request leaves this machine's loopback range.
    address = "127.0.0.2"
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "artefact", "ui", "--host", address, "--port", str(port)]
        + ["--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://{address}:{port}/api/2.0/mlflow/experiments/search?max_results=1"):
                    break
            except urllib.error.HTTPError as error:
                raise AssertionError(f"the server refused its own address: HTTP {error.code}") from None
            except OSError:
                assert server.poll() is None, server.stderr.read()
                assert time.monotonic() < deadline, "the MLflow UI did not answer in 120 s"
                time.sleep(1)
    finally:
        os.killpg(server.pid, 15)
        _, errors = server.communicate(timeout=30)
    assert f"warning: serving MLflow on {address}" in errors
