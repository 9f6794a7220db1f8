"""``make install TORCH=<build>``: the chosen CUDA build is checked against its index before
pip runs, here against a local index in PyTorch's layout (these machines cannot reach
download.pytorch.org)."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "install_torch.py"
TAG = f"cp{sys.version_info.major}{sys.version_info.minor}"


def _index(root: Path, wheels: dict[str, list[str]]) -> str:
    """A PEP 503 index as download.pytorch.org/whl/<build> lays it out: one page per package,
    linking wheels by URL-encoded name with a hash fragment."""
    for package, versions in wheels.items():
        page = root / package
        page.mkdir(parents=True)
        links = "".join(
            f'<a href="/whl/{package}-{v.replace("+", "%2B")}-{TAG}-{TAG}-manylinux_2_28_{platform.machine()}.whl'
            f'#sha256=00">{package}-{v}</a><br/>\n'
            for v in versions
        )
        (page / "index.html").write_text(f"<html><body>\n{links}</body></html>\n")
    return root.as_uri()


def _check(build: str, index: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), build, "--check", "--index-url", index], capture_output=True, text=True
    )


def test_a_build_the_index_serves_is_accepted_with_the_pinned_versions(tmp_path: Path) -> None:
    index = _index(
        tmp_path,
        {
            "torch": ["2.13.0+cu126", "2.14.1+cu126", "2.14.1+cu128"],
            "torchvision": ["0.29.1+cu126", "0.29.1+cu128"],
        },
    )
    done = _check("cu126", index)
    assert done.returncode == 0, done.stderr
    assert f"serves torch==2.14.1+cu126, torchvision==0.29.1+cu126 for {TAG}" in done.stdout


@pytest.mark.parametrize(
    ("build", "wheels", "expected"),
    [
        (
            "cu118",
            {"torch": ["2.14.1+cu126", "2.14.1+cu128"], "torchvision": ["0.29.1+cu126"]},
            "serves no torch 2.14.1+cu118 for {tag} on {machine} (it has 2.14.1+cu126, 2.14.1+cu128)",
        ),
        (
            "cu126",
            {"torch": ["2.14.1+cu126"], "torchvision": ["0.28.0+cu126"]},
            "serves no torchvision 0.29.1+cu126 for {tag} on {machine} (it has no build of that version)",
        ),
    ],
    ids=["build-not-served", "torchvision-missing"],
)
def test_a_build_the_index_lacks_fails_before_pip_with_what_it_has(
    tmp_path: Path, build: str, wheels: dict, expected: str, bad_input_tried
) -> None:
    done = _check(build, _index(tmp_path, wheels))
    assert done.returncode == 1 and done.stdout == ""
    assert expected.format(tag=TAG, machine=platform.machine()) in done.stderr
    assert "choose another TORCH= build" in done.stderr
    bad_input_tried("torch build")


def test_a_misspelt_build_and_an_unreachable_index_are_named(tmp_path: Path, bad_input_tried) -> None:
    misspelt = _check("cuda12", tmp_path.as_uri())
    assert misspelt.returncode == 1 and "TORCH=cuda12: name a PyTorch build such as cu126" in misspelt.stderr
    missing = _check("cu126", (tmp_path / "nowhere").as_uri())
    assert missing.returncode == 1 and "cannot read" in missing.stderr and "TORCH=cu126" in missing.stderr
    bad_input_tried("torch build")


def test_make_install_runs_the_check_for_the_chosen_build_and_remembers_it() -> None:
    planned = subprocess.run(
        ["make", "-n", "install", "TORCH=cu126", "VENV=/nonexistent-venv"], cwd=REPO, capture_output=True, text=True
    )
    assert planned.returncode == 0, planned.stderr
    lines = planned.stdout.splitlines()
    install = lines.index("/nonexistent-venv/bin/python scripts/install_torch.py cu126")
    assert "pip install --quiet -e '.[dev]'" in lines[install + 1]
    assert "echo cu126 >/nonexistent-venv/torch-build" in lines
