"""Shared fixtures: the built-in synthetic data set, prepared once per session, and the
default sweep (the main job with no options), run once for every test that reads it. How the
suite shares two pytest-xdist workers (pytest_collection_modifyitems). Which tests need
Debian packages that ``make test`` does not install (SYSTEM_TESTS).

Torch runs single-threaded here. On the 2-core build machines, two intra-op threads that
compete with any other load slowed a CPU epoch about 20x (12 s -> 254 s); one thread is
barely slower on an idle machine and steady on a busy one. Subprocesses inherit
OMP_NUM_THREADS=1.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from builders import CHROMIUM, small_config  # noqa: E402

torch.set_num_threads(1)


REQUIRE_SYSTEM_TESTS = "ARTEFACT_REQUIRE_SYSTEM_TESTS"
"""Set to 1 (.ci/run does) to fail, not skip, a test whose Debian packages are missing."""
SYSTEM_TESTS = {
    # marker: (what its tests need, the programs that show it is installed)
    "browser": ("Debian's Chromium", (str(CHROMIUM),)),
    "slurm": ("SLURM and munge", ("slurmctld", "slurmd", "sbatch", "scontrol", "munged", "mungekey")),
    "multinode": (
        "SLURM, munge and network namespaces",
        ("slurmctld", "slurmd", "sbatch", "munged", "mungekey", "ip", "nsenter", "unshare"),
    ),
    "shellcheck": ("shellcheck", ("shellcheck",)),
    "compiler": ("g++, for TorchInductor's CPU kernels", ("g++",)),
}
"""Tests that drive system programs: ``make test`` leaves installing them to ``make system-deps``."""

SHARED_SESSION_FIXTURES = {
    "default_sweep": "default_sweep",
    "slurm": "slurm",
    "slurm_hosts": "slurm",
    (RAY_TRAIN_GROUP := "ray_train_sweep"): RAY_TRAIN_GROUP,
}
"""Fixtures too costly, or too global, to build once per test worker, and the group of
tests each puts on one worker: the default sweep (about a minute), the SLURM clusters (one
node, and several hosts in network namespaces: one at a time, on the worker that runs the
other), and the Ray Train sweep, whose group also holds the other Ray Train sweeps: three
processes per trial each, they thrash two cores when two run at once (measured: 150 s
alone, 680 s beside another)."""


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The suite runs on two workers (pytest-xdist, ``-n 2`` in pyproject.toml). The slow
    tests go first so that both workers end together, and each test of a shared session
    fixture goes to the one worker that builds it."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
    for item in items:
        for fixture, group in SHARED_SESSION_FIXTURES.items():
            if fixture in item.fixturenames:
                item.add_marker(pytest.mark.xdist_group(group))


@pytest.hookimpl(tryfirst=True)  # before the fixtures are set up
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Fails a grouped test that xdist did not group, before its fixture starts: two workers
    would each start a SLURM cluster on the same ports, and the second fail puzzlingly."""
    grouped = getattr(item.config.option, "loadgroup", False) and item.get_closest_marker("xdist_group")
    if grouped and "@" not in item.nodeid:
        pytest.fail(
            "pytest-xdist did not put this test in its group (pytest-xdist#1386, with pytest 9.2):"
            " reinstall the dev dependencies (`pip install -e '.[dev]'`, which pins pytest<9.2)."
        )
    _check_system_programs(item)


def _check_system_programs(item: pytest.Item) -> None:
    """Skips a test whose system programs are missing, with one line saying how to install
    them; fails it instead where REQUIRE_SYSTEM_TESTS is 1, so that CI never skips one."""
    for marker, (what, programs) in SYSTEM_TESTS.items():
        if item.get_closest_marker(marker) is None:
            continue
        missing = [program for program in programs if shutil.which(program) is None]
        if missing:
            reason = f"needs {what}: run `make system-deps` (installs them with apt)"
        elif marker == "slurm" and os.geteuid() != 0:
            reason = "needs root: slurmd starts the jobs as root"
        elif marker == "multinode" and os.geteuid() != 0:
            reason = "needs root: the hosts are network namespaces, and slurmd starts the jobs as root"
        else:
            continue
        if os.environ.get(REQUIRE_SYSTEM_TESTS) == "1":
            pytest.fail(f"{reason} (missing: {', '.join(missing) or 'root'}; {REQUIRE_SYSTEM_TESTS}=1)", pytrace=False)
        pytest.skip(reason)


@pytest.fixture
def bad_input_tried(request: pytest.FixtureRequest):
    """Call with the kind of bad input once the test has seen it refused properly."""
    return lambda kind: request.node.user_properties.append(("bad_input_tried", kind))


@pytest.fixture
def fault_survived(request: pytest.FixtureRequest):
    """Call with the scenario and the metric rows read back from MLflow, once all checks passed."""

    def record(scenario: str, rows_read_back: int = 0) -> None:
        request.node.user_properties.append(("fault_survived", (scenario, rows_read_back)))

    return record


BAD_INPUTS_TRIED: list[str] = []
"""The kind of each bad input a test saw refused (bad_input_tried), for the summary line."""

FAULTS_SURVIVED: dict[str, int] = {}
"""Each fault scenario a test saw survived, with the MLflow metric rows it read back (none lost)."""


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Gathers what the tests recorded. Their properties travel with their reports, which
    reach this process from the xdist workers as well."""
    if report.when != "call" or not report.passed:
        return
    for name, value in report.user_properties:
        if name == "bad_input_tried":
            BAD_INPUTS_TRIED.append(value)
        elif name == "fault_survived":
            scenario, rows = value
            FAULTS_SURVIVED[scenario] = FAULTS_SURVIVED.get(scenario, 0) + rows


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
