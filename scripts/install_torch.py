"""Install the pinned torch and torchvision for one CUDA build, as ``make install TORCH=<build>``.

``default`` is PyPI's build (CUDA 13: GPUs sm_75 and newer, and the CPU), which
``pip install -e .`` installs into the fresh venv that the Makefile makes for a change of
build. Any other build (``cu126`` for a V100) comes from PyTorch's own index; its simple
pages are read first, so that a build the index does not serve for the pinned versions fails
here, in one line, rather than deep inside pip.

Standard library only: it runs before the project is installed.
"""

from __future__ import annotations

import argparse
import html.parser
import platform
import re
import subprocess
import sys
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

PYTORCH_INDEX = "https://download.pytorch.org/whl"
PACKAGES = ("torch", "torchvision")
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


class _Links(html.parser.HTMLParser):
    """The file names a PEP 503 simple page links to."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        href = dict(attrs).get("href")
        if tag == "a" and href:
            self.names.append(urllib.parse.unquote(href.split("#")[0].rsplit("/", 1)[-1]))


def pinned_versions(pyproject: Path = PYPROJECT) -> dict[str, str]:
    """torch and torchvision's ``==`` pins in the project's dependencies."""
    dependencies = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["dependencies"]
    pins = dict(found.groups() for d in dependencies if (found := re.fullmatch(r"([\w.-]+)==([^;\s]+)", d.strip())))
    return {package: pins[package] for package in PACKAGES}


def served_versions(index: str, package: str, python_tag: str, machine: str) -> set[str]:
    """Versions of ``package`` the index has a wheel of for this Python and machine."""
    page_url = f"{index.rstrip('/')}/{package}/"
    if page_url.startswith("file:"):  # a local mirror: its folders hold index.html, as pip reads them
        page_url += "index.html"
    with urllib.request.urlopen(page_url, timeout=60) as page:
        links = _Links()
        links.feed(page.read().decode("utf-8", errors="replace"))
    wheel = re.compile(rf"{package}-([^-]+)-{python_tag}-{python_tag}-\w*{machine}\.whl")
    return {found.group(1) for name in links.names if (found := wheel.fullmatch(name))}


def check_served(build: str, index: str, pins: dict[str, str], python_tag: str, machine: str) -> list[str]:
    """The requirements to install (``torch==2.14.1+cu126``, ...); exits with one line when
    the index lacks one of them."""
    wanted = []
    for package, version in pins.items():
        version = f"{version}+{build}"
        try:
            served = served_versions(index, package, python_tag, machine)
        except (urllib.error.URLError, OSError) as error:
            sys.exit(f"error: cannot read {index}/{package}/ ({error}); check the network or TORCH={build}.")
        if version not in served:
            builds = sorted(v for v in served if v.startswith(pins[package] + "+"))
            offer = f"it has {', '.join(builds)}" if builds else "it has no build of that version"
            sys.exit(
                f"error: {index} serves no {package} {version} for {python_tag} on {machine} ({offer});"
                " choose another TORCH= build, e.g. cu126 or cu128."
            )
        wanted.append(f"{package}=={version}")
    return wanted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("build", help="default, or a PyTorch index build such as cu126")
    parser.add_argument("--index-url", help=f"the build's index (default: {PYTORCH_INDEX}/<build>)")
    parser.add_argument("--check", action="store_true", help="only check that the index serves the pins")
    args = parser.parse_args(argv)
    if args.build == "default":
        return 0  # pip install -e . takes the pins from PyPI
    if not re.fullmatch(r"cu\d{3}|rocm[\d.]+|cpu|xpu", args.build):
        sys.exit(f"error: TORCH={args.build}: name a PyTorch build such as cu126, cu128, cu130 or cpu.")
    index = args.index_url or f"{PYTORCH_INDEX}/{args.build}"
    python_tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    wanted = check_served(args.build, index, pinned_versions(), python_tag, platform.machine())
    if args.check:
        print(f"{index} serves {', '.join(wanted)} for {python_tag} on {platform.machine()}")
        return 0
    return subprocess.call([sys.executable, "-m", "pip", "install", "--quiet", *wanted, "--index-url", index])


if __name__ == "__main__":
    sys.exit(main())
