"""Shared fixtures: the built-in synthetic data set, prepared once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
from builders import small_config


@pytest.fixture(scope="session")
def synthetic_workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("workspace")


@pytest.fixture(scope="session")
def synthetic_cache(synthetic_workspace: Path) -> Path:
    """The built-in 48-image synthetic set, prepared once (38 train / 10 val images)."""
    from artefact.data.prepare import ensure_cache

    return ensure_cache(small_config().data, synthetic_workspace, log=lambda *_: None)
