"""The ecosystem's conventions: a non-editable install runs from any folder, MLflow's own
variable and source tags are honoured, and system programs are never installed behind the
user's back."""

from __future__ import annotations

import ast
import importlib.resources
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from builders import free_port
from mlflow.tracking import MlflowClient
from sweep_helpers import REPO

from artefact import cli, sweep_cli
from artefact.config_files import PROFILES, default_tracking_uri, profile_file
from artefact.tracking.store import SOURCE_GIT_COMMIT_TAG, SOURCE_NAME_TAG, SOURCE_TYPE_TAG, open_sweep


def test_the_profiles_are_package_data_and_sweeps_links_to_each() -> None:
    assert PROFILES == Path(str(importlib.resources.files("artefact.profiles")))
    shipped = sorted(path.name for path in PROFILES.glob("*.yaml"))
    linked = sorted(path.name for path in (REPO / "sweeps").glob("*.yaml"))
    assert "cpu-smoke.yaml" in shipped and linked == shipped
    assert all((REPO / "sweeps" / name).resolve() == PROFILES / name for name in linked)
    assert profile_file("cpu-smoke") == ("cpu-smoke", PROFILES / "cpu-smoke.yaml")
    assert profile_file(str(REPO / "sweeps" / "laptop.yaml"))[0] == "laptop"


def test_an_installed_wheel_runs_the_main_job_from_another_folder(tmp_path: Path) -> None:
    """What ``pip install .`` (not editable) installs: the package with its profiles, whose
    defaults then point at the current folder instead of a checkout."""
    source = tmp_path / "source"
    shutil.copytree(REPO / "artefact", source / "artefact", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source)
    # Built with this venv's setuptools (torch depends on it), offline; from a copy, so no build/ in the checkout.
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", tmp_path, source], check=True
    )
    [wheel] = tmp_path.glob("artefact_sweeps-*.whl")
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", site, wheel], check=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    environment = {**os.environ, "PYTHONPATH": str(site)}  # before the checkout's editable install
    environment.pop("MLFLOW_TRACKING_URI", None)

    def run(*arguments: str) -> str:
        done = subprocess.run(
            [sys.executable, *arguments], cwd=elsewhere, env=environment, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    where = run(
        "-c",
        "import artefact.config as c, artefact.config_files as f; print(c.__file__); print(f.PROFILES);"
        " print(f.project_folder())",
    )
    assert where.split() == [
        str(site / "artefact" / "config.py"),
        str(site / "artefact" / "profiles"),
        str(elsewhere),
    ]
    assert "sweep" in run("-m", "artefact", "--help")
    assert f"default: {elsewhere / 'results'}" in run("-m", "artefact", "sweep", "--help")
    checked = run("-m", "artefact", "sweep", "--profile", "cpu-smoke", "--check")
    assert "ok: profile cpu-smoke" in checked
    assert list(elsewhere.iterdir()) == []  # a check writes nothing


def test_sweep_is_the_main_job_under_python_m_artefact(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["sweep", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: python -m artefact sweep") and "--check" in text


def test_mlflow_tracking_uri_is_the_store_when_no_flag_names_one(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///relative/mlflow.db")
    from_environment = f"sqlite:///{tmp_path / 'relative' / 'mlflow.db'}"  # absolute: trials run elsewhere
    assert default_tracking_uri() == from_environment
    flags = [
        "--name",
        "s",
        "--results",
        str(tmp_path / "r"),
        "--workspace",
        str(tmp_path / "w"),
        "--profile",
        "cpu-smoke",
    ]
    assert sweep_cli.build_request(sweep_cli.parse_args(flags)).tracking_uri == from_environment
    given = f"sqlite:///{tmp_path / 'given.db'}"
    assert sweep_cli.build_request(sweep_cli.parse_args([*flags, "--tracking-uri", given])).tracking_uri == given

    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert default_tracking_uri() == f"sqlite:///{REPO / 'mlflow' / 'mlflow.db'}"  # a checkout's own store


def test_the_ui_serves_the_store_mlflow_tracking_uri_names(tmp_path: Path, monkeypatch) -> None:
    store = tmp_path / "env.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    commands: list[list[str]] = []
    monkeypatch.setattr(cli.subprocess, "call", lambda command, env: commands.append(command) or 0)
    assert cli.main(["ui", "--port", "5999"]) == 0
    [command] = commands
    assert command[command.index("--backend-store-uri") + 1] == f"sqlite:///{store}"
    assert command[command.index("--artifacts-destination") + 1] == str(tmp_path / "artifacts")


def test_a_dead_server_in_mlflow_tracking_uri_is_named_as_such(tmp_path: Path, monkeypatch, capsys, bad_input_tried):
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    code = sweep_cli.main(["--results", str(tmp_path / "r"), "--workspace", str(tmp_path / "w")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: MLFLOW_TRACKING_URI={uri}: the MLflow server does not answer"), err
    assert len(err.strip().splitlines()) == 1 and list(tmp_path.iterdir()) == []
    bad_input_tried("environment")


def _parent_tags(uri: str, sweep: str) -> dict[str, str]:
    run = open_sweep(uri, sweep, {"profile": "cpu-smoke"})
    return MlflowClient(uri).get_run(run.parent_run_id).data.tags


def test_the_parent_run_carries_mlflow_source_tags(tmp_path: Path, monkeypatch) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    script = REPO / "sweeps" / "encoder_bench.py"
    monkeypatch.setattr(sys, "argv", [str(script)])
    tags = _parent_tags(uri, "from-checkout")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    assert tags[SOURCE_NAME_TAG] == str(script) and tags[SOURCE_TYPE_TAG] == "LOCAL"
    assert tags.get(SOURCE_GIT_COMMIT_TAG) == (head.stdout.strip() if head.returncode == 0 else None)
    assert tags["profile"] == "cpu-smoke"

    installed = tmp_path / "site" / "artefact" / "__main__.py"  # outside any git checkout
    installed.parent.mkdir(parents=True)
    installed.touch()
    monkeypatch.setattr(sys, "argv", [str(installed)])
    tags = _parent_tags(uri, "installed")
    assert tags[SOURCE_NAME_TAG] == str(installed) and SOURCE_GIT_COMMIT_TAG not in tags


SYSTEM_TESTS = {
    "tests/test_slurm.py::test_cluster_scripts_pass_shellcheck": "needs shellcheck: run `make system-deps`",
    "tests/test_slurm.py::test_config_values_never_reach_a_shell": "needs SLURM and munge: run `make system-deps`",
}
"""Tests that need programs on PATH (Chromium is found by its path, so the same check cannot hide it)."""


def _pytest_without_system_programs(tmp_path: Path, require: bool, *tests: str) -> str:
    environment = {name: value for name, value in os.environ.items() if not name.startswith("PYTEST_")}
    environment["PATH"] = str(tmp_path)  # none of the system programs on it
    environment.pop("ARTEFACT_REQUIRE_SYSTEM_TESTS", None)
    if require:
        environment["ARTEFACT_REQUIRE_SYSTEM_TESTS"] = "1"
    command = [sys.executable, "-m", "pytest", "-n", "0", "-p", "no:cacheprovider", "-rsf", *tests]
    return subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=300).stdout


def test_missing_system_programs_skip_their_tests_with_how_to_install_them(tmp_path: Path) -> None:
    out = _pytest_without_system_programs(tmp_path, False, *SYSTEM_TESTS)
    skipped = [line for line in out.splitlines() if line.startswith("SKIPPED [1] ")]
    assert [sum(reason in line for line in skipped) for reason in SYSTEM_TESTS.values()] == [1, 1], out
    assert "2 skipped" in out, out

    out = _pytest_without_system_programs(tmp_path, True, *SYSTEM_TESTS)  # as CI runs: fails at setup
    assert "2 errors" in out and "missing: shellcheck; ARTEFACT_REQUIRE_SYSTEM_TESTS=1" in out, out


def _imported_packages(module: Path) -> set[str]:
    """The top-level packages a module imports anywhere in it, lazy imports included."""
    tree = ast.parse(module.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_ray_and_mlflow_each_have_one_package_and_no_module_grows_past_400_lines() -> None:
    package = REPO / "artefact"
    modules = sorted(package.rglob("*.py"))
    importers = {
        name: {str(m.relative_to(package)) for m in modules if name in _imported_packages(m)}
        for name in ("ray", "mlflow")
    }
    assert importers["ray"] and all(path.startswith("tune/") for path in importers["ray"]), importers["ray"]
    assert importers["mlflow"] and all(path.startswith("tracking/") for path in importers["mlflow"]), importers
    assert "tracking/vocabulary.py" not in importers["mlflow"]  # trial processes read it without mlflow
    long = {str(m.relative_to(package)): n for m in modules if (n := len(m.read_text().splitlines())) > 400}
    assert long == {}
