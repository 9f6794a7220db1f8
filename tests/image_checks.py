"""Checks that a PNG figure was really drawn."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from artefact.report import figures


def assert_drawn(path: Path, size: tuple[float, float]) -> np.ndarray:
    """The PNG decodes at ``size`` inches x DPI and shows more than a few flat colours."""
    assert path.is_file(), path
    with Image.open(path) as image:
        image.load()
        assert image.format == "PNG"
        assert image.size == (round(size[0] * figures.DPI), round(size[1] * figures.DPI)), image.size
        pixels = np.asarray(image.convert("RGB"))
    colours = np.unique(pixels.reshape(-1, 3), axis=0)
    assert len(colours) > 20, f"{path.name} is nearly blank ({len(colours)} colours)"
    return pixels
