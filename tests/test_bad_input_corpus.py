"""The bad-input corpus in ``tests/bad_inputs``: every case gets a clear error, exit code 2
and no partial output. The pytest summary prints how many bad inputs were tried in all."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest
import torch
from builders import free_port
from huggingface_hub import constants
from mlflow.tracking import MlflowClient
from sweep_helpers import import_script

from artefact import cli

CORPUS = Path(__file__).parent / "bad_inputs"
CONFIGS = sorted((CORPUS / "configs").glob("*.yaml"))
CANARY = "bad-input-canary"
"""The file a case that reached a shell or built a Python object would create."""
encoder_bench = import_script("encoder_bench")


def _flag_cases() -> list[tuple[str, list[str], str]]:
    cases = []
    for line in (CORPUS / "flags.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            command, _, expected = line.partition("  =>  ")
            program, *arguments = shlex.split(command)
            cases.append((program, arguments, expected.strip()))
    return cases


FLAGS = _flag_cases()


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch) -> Path:
    """An empty current folder, an empty Hugging Face cache, and the Ray token settings
    restored after the case."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-hub"))
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "token"))
    return tmp_path


def _main_job(workdir: Path, *arguments: str) -> int:
    store = f"sqlite:///{workdir / 'mlflow.db'}"
    defaults = ["--results", "results", "--workspace", "ws"]
    defaults += [] if "--tracking-uri" in arguments else ["--tracking-uri", store]
    return encoder_bench.main([*defaults, *arguments])


def _assert_refused(code: int, err: str, expected: str, workdir: Path) -> None:
    assert code == 2, err
    assert re.search(expected, err), err
    assert "Traceback" not in err
    assert "ray" not in sys.modules or not __import__("ray").is_initialized()
    assert not (workdir / CANARY).exists() and not (Path.cwd() / CANARY).exists()
    assert [p.name for p in (workdir / "results").glob("*") if not p.name.startswith(".")] == []
    assert not list((workdir / "ws").glob("cache-*")) and not (workdir / "cache").exists()
    store = workdir / "mlflow.db"
    if store.exists():
        client = MlflowClient(f"sqlite:///{store}")
        assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


@pytest.mark.parametrize("profile", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_bad_config_file(profile: Path, workdir: Path, capsys, bad_input_tried) -> None:
    expected = profile.read_text().splitlines()[0].removeprefix("# error: ")
    if "gpus_per_worker: 1" in profile.read_text() and not torch.cuda.is_available():
        expected = "asks for GPUs .* but CUDA is not usable here"  # a GPU profile stops at that, first
    code = _main_job(workdir, "--profile", str(profile))
    err = capsys.readouterr().err
    _assert_refused(code, err, expected, workdir)
    # One line of our own (in process, MLflow's INFO lines may precede it: it was imported first).
    assert err.strip().splitlines()[-1].startswith("error: ") and err.count("error: ") == 1, err
    bad_input_tried("config file")


@pytest.mark.parametrize(("program", "arguments", "expected"), FLAGS, ids=[" ".join(c[:2][1]) for c in FLAGS])
def test_bad_flags(program: str, arguments: list[str], expected: str, workdir: Path, capsys, bad_input_tried) -> None:
    # The port is picked now, not at collection: the test ids must be the same on every xdist worker.
    arguments = [argument.replace("{free_port}", str(free_port())) for argument in arguments]
    try:
        code = _main_job(workdir, *arguments) if program == "encoder_bench" else cli.main(arguments)
    except SystemExit as exit:  # argparse's own refusals
        code = exit.code
    _assert_refused(code, capsys.readouterr().err, expected, workdir)
    bad_input_tried("command-line flags")


def test_the_corpus_has_every_kind_of_case() -> None:
    texts = [p.read_text() for p in CONFIGS]
    for kind in ("must be an integer", "unknown config key", "expected > 0", "must be a finite number", "!!python"):
        assert any(kind in text for text in texts), kind
    assert {program for program, _, _ in FLAGS} == {"encoder_bench", "artefact"}
