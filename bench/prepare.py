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

from artefact.data.sources.parquet import ParquetWriter
from artefact.data.sources.synthetic import generate, render

REPO = Path(__file__).resolve().parents[1]
TILE = (500, 625)
"""One rendered synthetic sample, tiled to build the huge image (rendering 200 MP directly
would take minutes)."""


NOISE = 6
"""Grain added to the tiled image (+-levels): without it the PNG would compress to almost
nothing, and a real photograph's encoded bytes, which prepare also holds, would be missed."""


def huge_sample(megapixels: float) -> tuple[Image.Image, Image.Image]:
    """An artwork of about ``megapixels`` with a matching mask, from one tiled sample."""
    rng = np.random.default_rng(7)
    image, mask = render(rng, *TILE, "Canvas", "Artistic depiction")
    tiles = math.ceil(math.sqrt(megapixels * 1e6 / (TILE[0] * TILE[1])))
    art = np.tile(image, (tiles, tiles, 1))
    art += rng.integers(0, NOISE, size=art.shape, dtype=np.uint8)  # wraps at 255: grain, not a bias
    return Image.fromarray(art), Image.fromarray(np.tile(mask, (tiles, tiles)))


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


PEAK_REPORTER = (
    "import atexit, runpy, sys\n"
    "def peak():\n"
    "    status = open('/proc/self/status').read()\n"
    "    print('VmHWM_kB', status.split('VmHWM:')[1].split()[0], file=sys.stderr)\n"
    "atexit.register(peak)\n"
    "sys.argv[0] = 'artefact'\n"
    "runpy.run_module('artefact', run_name='__main__')\n"
)
"""Runs ``python -m artefact`` and prints its own peak RSS (VmHWM) at exit. The peak must
come from inside: the rusage that wait4 returns counts the parent's resident memory, which
the child held for a moment between fork and exec."""


def prepare_peak(source: Path, out: Path, max_side: int) -> dict[str, float]:
    """Peak RSS and duration of one ``prepare`` run, in a process of its own."""
    command = [sys.executable, "-c", PEAK_REPORTER, "prepare", "--source", str(source), "--out", str(out)]
    command += ["--max-side", str(max_side)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"prepare failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
    peak_kb = int(done.stderr.rsplit("VmHWM_kB", 1)[1].split()[0])
    return {"seconds": seconds, "peak_rss_mb": peak_kb / 1024}


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
