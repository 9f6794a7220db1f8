"""Shared fixtures: the built-in synthetic data set, prepared once per session, and the
default sweep (the main job with no options), run once for every test that reads it.

Torch runs single-threaded here. On the 2-core build machines, two intra-op threads that
compete with any other load slowed a CPU epoch about 20x (12 s -> 254 s); one thread is
barely slower on an idle machine and steady on a busy one. Subprocesses inherit
OMP_NUM_THREADS=1.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from builders import small_config  # noqa: E402

torch.set_num_threads(1)


BAD_INPUTS_TRIED: list[str] = []
"""The kind of each bad input a test saw refused (bad_input_tried), for the summary line."""


@pytest.fixture
def bad_input_tried():
    """Call with the kind of bad input once the test has seen it refused properly."""
    return BAD_INPUTS_TRIED.append


FAULTS_SURVIVED: dict[str, int] = {}
"""Each fault scenario a test saw survived, with the MLflow metric rows it read back (none lost)."""


@pytest.fixture
def fault_survived():
    """Call with the scenario and the metric rows read back from MLflow, once all checks passed."""

    def record(scenario: str, rows_read_back: int = 0) -> None:
        FAULTS_SURVIVED[scenario] = FAULTS_SURVIVED.get(scenario, 0) + rows_read_back

    return record


def pytest_terminal_summary(terminalreporter) -> None:
    if FAULTS_SURVIVED:
        rows = sum(FAULTS_SURVIVED.values())
        terminalreporter.write_line(
            f"fault scenarios survived: {len(FAULTS_SURVIVED)} ({'; '.join(FAULTS_SURVIVED)});"
            f" metric rows read back from MLflow: {rows}, none lost or doubled"
        )
    if BAD_INPUTS_TRIED:
        kinds = {kind: BAD_INPUTS_TRIED.count(kind) for kind in dict.fromkeys(BAD_INPUTS_TRIED)}
        detail = ", ".join(f"{kind} {count}" for kind, count in kinds.items())
        terminalreporter.write_line(f"bad inputs tried and refused: {len(BAD_INPUTS_TRIED)} ({detail})")


@pytest.fixture(scope="session")
def synthetic_workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("workspace")


@pytest.fixture(scope="session")
def synthetic_cache(synthetic_workspace: Path) -> Path:
    """The built-in 48-image synthetic set, prepared once (38 train / 10 val images)."""
    from artefact.data.prepare import ensure_cache

    return ensure_cache(small_config().data, synthetic_workspace, log=lambda *_: None)


@pytest.fixture(scope="session")
def default_sweep(tmp_path_factory: pytest.TempPathFactory, synthetic_workspace: Path):
    """The main job with its defaults, named "default", into its own results folder and store."""
    from sweep_helpers import run_bench_watching_dashboard

    root = tmp_path_factory.mktemp("default-sweep")
    store = root / "mlflow.db"
    watched = run_bench_watching_dashboard(root / "results", synthetic_workspace, store, "default")
    return watched, root / "results", store
