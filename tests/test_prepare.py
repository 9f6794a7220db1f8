"""prepare: reuse, rebuild, atomicity when interrupted, resizing, and bounded memory."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import REPO, Row, random_rows, write_folder, write_png_streaming

from artefact.config import Config, DataConfig
from artefact.data import prepare as prep
from artefact.data.cache import CLASS_PIXELS, PrepareParams, class_pixels, read_index
from artefact.data.prepare import ensure_cache, prepare
from artefact.errors import UserError
from artefact.losses import class_weights
from artefact.taxonomy import COARSE_LUT, VALID_MASK_VALUES
from artefact.train.loop import build_loss

QUIET = {"log": lambda *_: None}


def _source(tmp_path: Path, count: int = 6, **kwargs) -> Path:
    return write_folder(tmp_path / "src", random_rows(count, **kwargs))


def test_second_call_reuses_the_cache(tmp_path: Path) -> None:
    source = _source(tmp_path)
    messages: list[str] = []
    out = prepare(source, tmp_path / "cache", PrepareParams(), log=messages.append)
    manifest = out / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    index = (out / "index.csv").read_text()
    time.sleep(0.01)
    assert prepare(source, tmp_path / "cache", PrepareParams(), log=messages.append) == out
    assert manifest.stat().st_mtime_ns == stamp
    assert (out / "index.csv").read_text() == index
    assert "reusing" in messages[-1]


def test_cache_contents(tmp_path: Path) -> None:
    rows = random_rows(6)
    source = write_folder(tmp_path / "src", rows)
    out = prepare(source, tmp_path / "cache", PrepareParams(), **QUIET)
    with (out / "index.csv").open() as handle:
        assert next(csv.reader(handle)) == [
            "id",
            "group",
            "material",
            "content",
            "split",
            "fold",
            "copy_of",
            "height",
            "width",
        ]
    index = read_index(out)
    assert sorted(r["id"] for r in index) == [r.id for r in rows]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {
        "train": sum(r["split"] == "train" for r in index),
        "val": sum(r["split"] == "val" for r in index),
    }
    assert manifest["params"]["max_side"] == 512
    for row in rows:  # smaller than max_side: stored unchanged
        assert np.array_equal(np.load(out / "images" / f"{row.id}.npy"), row.image)
        assert np.array_equal(np.load(out / "masks" / f"{row.id}.npy"), row.mask)
    assert {p.name for p in tmp_path.iterdir()} == {"src", "cache"}, "no .partial left behind"


def test_parameter_or_source_change_rebuilds(tmp_path: Path) -> None:
    source = _source(tmp_path, size=(60, 90))
    out = prepare(source, tmp_path / "cache", PrepareParams(), **QUIET)
    first = json.loads((out / "manifest.json").read_text())["fingerprint"]
    messages: list[str] = []
    prepare(source, out, PrepareParams(max_side=45), log=messages.append)
    assert any("rebuilding" in m for m in messages)
    second = json.loads((out / "manifest.json").read_text())["fingerprint"]
    assert second != first
    assert np.load(out / "images" / "s000.npy").shape == (30, 45, 3)

    # Editing a source file also invalidates the cache.
    messages.clear()
    os.utime(source / "annotations" / "s001.png", ns=(1, 1))
    prepare(source, out, PrepareParams(max_side=45), log=messages.append)
    assert any("rebuilding" in m for m in messages)
    assert json.loads((out / "manifest.json").read_text())["fingerprint"] != second


def test_refuses_to_overwrite_a_folder_that_is_not_a_cache(tmp_path: Path) -> None:
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="is not a cache"):
        prepare(_source(tmp_path), tmp_path / "busy", PrepareParams(), **QUIET)
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


def test_large_images_shrink_and_masks_stay_valid(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    height, width = 150, 230
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    # Blocks of a few classes: a bilinear resize would invent in-between values such as 3 or 130.
    blocks = np.array([[0, 7, 255], [1, 255, 15]], np.uint8)
    mask = np.kron(blocks, np.ones((75, 77), np.uint8))[:height, :width]
    rows = [Row("big", image, mask), *random_rows(3)]
    jpeg_rows = [Row("photo", np.full((400, 600, 3), 90, np.uint8), np.zeros((400, 600), np.uint8), "Wood")]
    write_folder(tmp_path / "src", rows)
    write_folder(tmp_path / "src", jpeg_rows, image_format="jpg")  # adds a JPEG (draft decoding)
    with (tmp_path / "src" / "metadata.csv").open("a", encoding="utf-8") as handle:
        for row in rows:
            handle.write(f"{row.id},{row.material},{row.content}\n")
    out = prepare(tmp_path / "src", tmp_path / "cache", PrepareParams(max_side=64), **QUIET)
    stored = {r["id"]: r for r in read_index(out)}
    assert (stored["big"]["height"], stored["big"]["width"]) == (42, 64)
    small_image = np.load(out / "images" / "big.npy")
    small_mask = np.load(out / "masks" / "big.npy")
    assert small_image.shape == (42, 64, 3) and small_image.dtype == np.uint8
    assert small_mask.shape == (42, 64) and small_mask.dtype == np.uint8
    assert set(np.unique(small_mask).tolist()) == {0, 1, 7, 15, 255}, "nearest keeps exactly the source values"
    assert small_mask[0, 0] == 0 and small_mask[-1, -1] == 15 and small_mask[0, -1] == 255
    photo = np.load(out / "images" / "photo.npy")
    assert photo.shape == (43, 64, 3) and abs(int(photo.mean()) - 90) <= 2
    for row_id in stored:
        assert max(np.load(out / "masks" / f"{row_id}.npy").shape) <= 64
        assert set(np.unique(np.load(out / "masks" / f"{row_id}.npy")).tolist()) <= VALID_MASK_VALUES


class _Boom(RuntimeError):
    pass


@pytest.mark.parametrize("error", [_Boom("source died"), KeyboardInterrupt()])
def test_interrupted_source_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error) -> None:
    source = _source(tmp_path)
    real = prep.read_source
    seen = []

    def dying(path: Path, max_pixels: int):
        for number, sample in enumerate(real(path, max_pixels)):
            if number == 3:
                raise error
            seen.append(sample.id)
            yield sample

    monkeypatch.setattr(prep, "read_source", dying)
    with pytest.raises(type(error)):
        prepare(source, tmp_path / "cache", PrepareParams(), **QUIET)
    assert len(seen) == 3, "the failure came after good samples were written"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_bad_sample_after_good_ones_leaves_nothing(tmp_path: Path) -> None:
    rows = random_rows(6)
    rows[4].mask[0, 0] = 99
    write_folder(tmp_path / "src", rows)
    with pytest.raises(UserError, match=r"values \[99\]"):
        prepare(tmp_path / "src", tmp_path / "cache", PrepareParams(), **QUIET)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_failed_rebuild_keeps_the_previous_cache(tmp_path: Path) -> None:
    rows = random_rows(6)
    source = write_folder(tmp_path / "src", rows)
    out = prepare(source, tmp_path / "cache", PrepareParams(), **QUIET)
    manifest = (out / "manifest.json").read_text()
    rows[2].mask[:] = 42
    write_folder(source, rows)
    with pytest.raises(UserError, match=r"values \[42\]"):
        prepare(source, out, PrepareParams(), **QUIET)
    assert (out / "manifest.json").read_text() == manifest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "src"]


def test_ensure_cache_uses_a_given_cache_and_prepares_a_raw_source(tmp_path: Path, synthetic_cache: Path) -> None:
    from artefact.config import DataConfig

    assert ensure_cache(DataConfig(path=str(synthetic_cache)), tmp_path) == synthetic_cache
    source = _source(tmp_path)
    cache = ensure_cache(DataConfig(path=str(source), max_side=64), tmp_path / "ws", **QUIET)
    assert cache.parent == tmp_path / "ws" and (cache / "manifest.json").is_file()
    assert ensure_cache(DataConfig(path=str(source), max_side=64), tmp_path / "ws", **QUIET) == cache
    other = ensure_cache(DataConfig(path=str(source), max_side=96), tmp_path / "ws", **QUIET)
    assert other != cache, "different parameters get their own cache"
    with pytest.raises(UserError, match="does not exist"):
        ensure_cache(DataConfig(path=str(tmp_path / "nowhere")), tmp_path / "ws", **QUIET)


def test_synthetic_cache_fixture(synthetic_cache: Path) -> None:
    index = read_index(synthetic_cache)
    assert len(index) == 48
    assert sum(r["split"] == "val" for r in index) == 10
    assert len({r["material"] for r in index if r["split"] == "val"}) == 10, "one val image per material"


# ------------------------------------------------------------------------------- class pixels

BURN_MARKS = 14


def _rows_with_burn_marks_in_validation(burn: bool) -> list[Row]:
    """Three Paper images (mostly Clean, some Material loss and Lightleak, a little Dust) and a
    Wood image that, with ``burn``, also holds Burn marks; ``holdout=material=Wood`` makes it
    the validation side."""
    rows = random_rows(4, materials=("Paper", "Paper", "Paper", "Wood"))
    for row in rows:
        row.mask[row.mask == 7] = 0
        row.mask[0, :3] = 3
    if burn:
        rows[3].mask[:6, :6] = BURN_MARKS
    return rows


def test_class_pixels_and_weights_come_from_the_training_side_only(tmp_path: Path) -> None:
    params = PrepareParams(holdout="material=Wood", augment_copies=1)
    rows = _rows_with_burn_marks_in_validation(burn=True)
    cache = prepare(write_folder(tmp_path / "src", rows), tmp_path / "cache", params, **QUIET)
    assert [r["split"] for r in read_index(cache) if r["id"] == rows[3].id] == ["val"]

    fine = 2 * sum(np.bincount(row.mask.ravel(), minlength=256) for row in rows[:3])  # each with one flipped copy
    stored = json.loads((cache / CLASS_PIXELS).read_text())
    assert stored["side"] == "train" and stored["images"] == 6
    assert stored["pixels"]["fine"] == fine[:16].tolist()
    assert stored["pixels"]["binary"] == [fine[0], fine[1:16].sum()]
    coarse = np.bincount(COARSE_LUT[np.arange(256)], weights=fine, minlength=256)[:4]
    assert stored["pixels"]["coarse"] == coarse.astype(int).tolist() and stored["pixels"]["coarse"][1] > 0
    assert stored["pixels"]["fine"][BURN_MARKS] == 0

    # The Burn marks in the validation image give them no weight: the weights are those of a
    # data set whose validation image has none.
    other = _rows_with_burn_marks_in_validation(burn=False)
    without = prepare(write_folder(tmp_path / "src2", other), tmp_path / "cache2", params, **QUIET)
    assert class_pixels(without) == class_pixels(cache)
    cfg = Config().replace(loss={"class_weights": "inverse_sqrt_log", "kind": "dice_ce"})
    weights = build_loss(cfg, cache, torch.device("cpu")).class_weights
    assert weights is not None and set(weights) == {"binary", "coarse", "fine"}
    assert weights["fine"][BURN_MARKS].item() == 0.0
    expected = class_weights(class_pixels(without)["fine"], "inverse_sqrt_log", cfg.loss.class_weight_clip)
    assert weights["fine"].tolist() == pytest.approx(expected)
    assert weights["fine"][3].item() > weights["fine"][0].item() > 0, "rare Dust outweighs Clean"


def test_a_cache_from_before_class_pixels_gets_them_on_first_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = prepare(_source(tmp_path), tmp_path / "cache", PrepareParams(), **QUIET)
    stored = (cache / CLASS_PIXELS).read_text()
    (cache / CLASS_PIXELS).unlink()
    assert ensure_cache(DataConfig(path=str(cache)), tmp_path / "ws", **QUIET) == cache
    assert (cache / CLASS_PIXELS).read_text() == stored, "counted from the training masks and saved"
    assert sorted(p.name for p in cache.iterdir() if p.name.startswith(".")) == [], "no temporary file left"

    (cache / CLASS_PIXELS).unlink()

    def read_only(*_) -> None:
        raise PermissionError("read-only file system")

    monkeypatch.setattr("artefact.data.cache.write_class_pixels", read_only)
    assert class_pixels(cache) == json.loads(stored)["pixels"], "a cache that cannot be written still trains"


# ------------------------------------------------------------------------------------- memory

HUGE_W, HUGE_H = 16_000, 12_500  # 200 megapixels


def _huge_image_band(y0: int, n: int) -> np.ndarray:
    rows = np.empty((n, HUGE_W, 3), np.uint8)
    rows[:] = (200, 180, 150)
    stripe = ((np.arange(y0, y0 + n) // 1000) % 2).astype(bool)
    rows[stripe, :2000] = (40, 60, 90)
    return rows


def _huge_mask_band(y0: int, n: int) -> np.ndarray:
    rows = np.zeros((n, HUGE_W, 1), np.uint8)
    rows[:, :500] = 255
    stripe = ((np.arange(y0, y0 + n) // 1000) % 2).astype(bool)
    rows[stripe, 2000:4000] = 3
    return rows


PEAK_RSS_WRAPPER = """
import resource, subprocess, sys
code = subprocess.run(sys.argv[1:]).returncode
print(code, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)  # KiB on Linux
"""


@pytest.mark.slow
def test_prepare_of_a_200_megapixel_image_stays_in_bounded_memory(tmp_path: Path) -> None:
    rows = random_rows(4, size=(64, 80))
    source = write_folder(tmp_path / "src", rows)
    write_png_streaming(source / "images" / "huge.png", HUGE_W, HUGE_H, 3, _huge_image_band)
    write_png_streaming(source / "annotations" / "huge.png", HUGE_W, HUGE_H, 1, _huge_mask_band)
    with (source / "metadata.csv").open("a", encoding="utf-8") as handle:
        handle.write("huge,Paper,Line art\n")

    out = tmp_path / "cache"
    # A small wrapper process runs prepare and reports its child's peak RSS. Measuring a child of
    # pytest directly would count the pages it shares with pytest (torch loaded, ~1 GB) at fork time.
    result = subprocess.run(
        [sys.executable, "-c", PEAK_RSS_WRAPPER, sys.executable, "-m", "artefact", "prepare"]
        + ["--source", str(source), "--out", str(out)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    *output, last = result.stdout.strip().splitlines()
    code, peak_kb = (int(v) for v in last.split())
    peak_mb = peak_kb / 1024
    print(f"peak RSS of prepare with a {HUGE_W}x{HUGE_H} image: {peak_mb:.0f} MB")
    assert code == 0, "\n".join(output) + result.stderr
    assert peak_mb <= 1536, f"prepare peaked at {peak_mb:.0f} MB"

    image = np.load(out / "images" / "huge.npy")
    mask = np.load(out / "masks" / "huge.npy")
    assert image.shape == (400, 512, 3) and mask.shape == (400, 512)
    assert set(np.unique(mask).tolist()) == {0, 3, 255}
    assert (mask[:, :10] == 255).all() and (image[:5, 100] == (200, 180, 150)).all()
