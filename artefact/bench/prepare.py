"""``prepare`` on a data set with one huge image: peak memory and throughput, measured on a
``python -m artefact prepare`` subprocess."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from artefact.data.parquet import ParquetWriter
from artefact.data.synthetic import generate, render

REPO = Path(__file__).resolve().parents[2]
TILE = (500, 625)
"""One rendered synthetic sample, tiled to build the huge image (rendering 200 MP directly
would take minutes)."""


def huge_sample(megapixels: float) -> tuple[Image.Image, Image.Image]:
    """An artwork of about ``megapixels`` with a matching mask, from one tiled sample."""
    image, mask = render(np.random.default_rng(7), *TILE, "Canvas", "Artistic depiction")
    tiles = math.ceil(math.sqrt(megapixels * 1e6 / (TILE[0] * TILE[1])))
    return Image.fromarray(np.tile(image, (tiles, tiles, 1))), Image.fromarray(np.tile(mask, (tiles, tiles)))


def build_source(root: Path, huge_megapixels: float, ordinary: int) -> float:
    """ARTeFACT-format parquet shards in ``root``: ``ordinary`` synthetic images plus one huge
    one in a shard of its own. Returns the huge image's megapixels."""
    generate(root, count=ordinary, layout="parquet", seed=1)
    image, mask = huge_sample(huge_megapixels)
    staging = root.parent / f"{root.name}-huge"
    writer = ParquetWriter(staging)
    writer.add("huge_0000", image, mask, "Canvas", "Artistic depiction")
    writer.close()
    for shard in (staging / "data").glob("*.parquet"):
        shard.rename(root / "data" / f"train-huge-{shard.name}")
    shutil.rmtree(staging)
    return image.width * image.height / 1e6


def prepare_peak(source: Path, out: Path, max_side: int) -> dict[str, float]:
    """Peak RSS and speed of one ``prepare`` run (its own process, so the peak is its own)."""
    command = [sys.executable, "-m", "artefact", "prepare", "--source", str(source), "--out", str(out)]
    command += ["--max-side", str(max_side)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    log = out.parent / "prepare.log"
    started = time.perf_counter()
    with log.open("w") as output:  # a file, not a pipe: a pipe left unread can block the child
        process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"prepare failed (log: {log}):\n{log.read_text()[-3000:]}")
    peak_mb = usage.ru_maxrss / 1024  # kilobytes on Linux
    return {"seconds": seconds, "peak_rss_mb": peak_mb}


def prepare_memory(workdir: Path, huge_megapixels: float, ordinary: int, max_side: int) -> dict[str, object]:
    source = workdir / "prepare-source"
    largest = build_source(source, huge_megapixels, ordinary)
    source_mb = sum(shard.stat().st_size for shard in (source / "data").glob("*.parquet")) / 1e6
    run = prepare_peak(source, workdir / "prepare-cache", max_side)
    return {
        "images": ordinary + 1,
        "largest_megapixels": round(largest, 1),
        "source_mb": round(source_mb, 1),
        "max_side": max_side,
        "seconds": round(run["seconds"], 2),
        "mb_per_s": round(source_mb / run["seconds"], 2),
        "peak_rss_mb": round(run["peak_rss_mb"], 1),
    }
