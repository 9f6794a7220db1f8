"""Helpers that write raw sources by hand, independently of the library's own writers."""

from __future__ import annotations

import csv
import io
import os
import socket
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from artefact.config import Config, from_dict

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/lib/chromium/chromium")
"""Debian's Chromium, which the browser tests drive."""

IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
"""The ``datasets`` Image feature, as ARTeFACT shards hold their images and masks."""


@dataclass
class Row:
    """One sample of a hand-made source: arrays plus metadata."""

    id: str
    image: np.ndarray
    mask: np.ndarray
    material: str = "Paper"
    content: str = "Line art"
    group: str | None = None
    extra: dict = field(default_factory=dict)


def random_rows(
    count: int, *, seed: int = 0, size: tuple[int, int] = (40, 48), materials: Sequence[str] = ("Paper", "Wood")
) -> list[Row]:
    """``count`` random samples whose masks use a few valid ids and Background."""
    rng = np.random.default_rng(seed)
    rows = []
    for index in range(count):
        image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        mask = rng.choice(np.array([0, 1, 7, 15, 255], dtype=np.uint8), size=size)
        rows.append(Row(f"s{index:03d}", image, mask, materials[index % len(materials)]))
    return rows


def png_bytes(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def write_folder(
    root: Path,
    rows: Sequence[Row],
    *,
    columns: Sequence[str] = ("id", "material", "content"),
    image_format: str = "png",
) -> Path:
    """The folder layout (images/, annotations/, metadata.csv), written with Pillow and csv only."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for row in rows:
        if image_format == "jpg":
            Image.fromarray(row.image).save(root / "images" / f"{row.id}.jpg", quality=95)
        else:
            Image.fromarray(row.image).save(root / "images" / f"{row.id}.png")
        Image.fromarray(row.mask).save(root / "annotations" / f"{row.id}.png")
    with (root / "metadata.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            record = {"id": row.id, "material": row.material, "content": row.content, **row.extra}
            record["group"] = row.group or ""
            writer.writerow(record)
    return root


def write_parquet_by_hand(path: Path, rows: Sequence[Row], *, row_group_size: int = 2) -> Path:
    """An ARTeFACT-like shard built directly with pyarrow (not the library's ParquetWriter).

    The columns come in another order than the real schema, there is an extra column, the
    struct's ``path`` is sometimes null and row groups hold several rows.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "material": pa.array([r.material for r in rows], pa.string()),
            "annotation": pa.array(
                [{"bytes": png_bytes(r.mask), "path": None} for r in rows],
                IMAGE_STRUCT,
            ),
            "id": pa.array([r.id for r in rows], pa.string()),
            "content": pa.array([r.content for r in rows], pa.string()),
            "image": pa.array(
                [{"bytes": png_bytes(r.image), "path": f"{r.id}.png"} for r in rows],
                IMAGE_STRUCT,
            ),
            "notes": pa.array([f"note {i}" for i in range(len(rows))], pa.string()),
        }
    )
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_png_streaming(
    path: Path, width: int, height: int, channels: int, band: Callable[[int, int], np.ndarray], rows_per_band: int = 256
) -> Path:
    """Write an 8-bit grey (1) or RGB (3) PNG band by band, so a 200 MP image never sits in memory.

    ``band(y0, n)`` returns rows ``y0 .. y0+n`` as an ``(n, width, channels)`` uint8 array.
    """
    colour_type = {1: 0, 3: 2}[channels]
    compressor = zlib.compressobj(1)
    with path.open("wb") as handle:
        handle.write(b"\x89PNG\r\n\x1a\n")
        handle.write(_png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)))
        for y0 in range(0, height, rows_per_band):
            rows = band(y0, min(rows_per_band, height - y0))
            raw = np.zeros((rows.shape[0], 1 + width * channels), np.uint8)  # filter byte 0 per row
            raw[:, 1:] = rows.reshape(rows.shape[0], -1)
            data = compressor.compress(raw.tobytes())
            if data:
                handle.write(_png_chunk(b"IDAT", data))
        handle.write(_png_chunk(b"IDAT", compressor.flush()))
        handle.write(_png_chunk(b"IEND", b""))
    return path


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m artefact ARGS`` in a subprocess, with the repository importable."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "artefact", *args],
        cwd=cwd or REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def leftovers(folder: Path) -> list[str]:
    """Names in ``folder`` that look like an (unfinished) cache: ``.partial`` or a manifest."""
    found = []
    for path in folder.iterdir():
        if path.name.endswith(".partial") or (path.is_dir() and (path / "manifest.json").exists()):
            found.append(path.name)
    return sorted(found)


def small_config(**sections: dict) -> Config:
    """A CPU config on the tiny ConvNeXt at 64 px; ``sections`` override it."""
    base = {
        "data": {"resolution": 64, "crops_per_image": 8},
        "model": {"encoder": "tu-test_convnext", "heads": ["fine"]},
        "train": {"epochs": 5, "lr": 3e-3, "batch_size": 8, "device": "cpu", "amp": "off"},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return from_dict(base)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
