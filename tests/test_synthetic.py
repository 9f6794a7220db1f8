"""The synthetic ARTeFACT stand-in: layout, value ranges, determinism, class coverage and shares."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from artefact.data.sources.parquet import read_parquet
from artefact.data.sources.synthetic import MATERIALS, generate, render
from artefact.errors import UserError
from artefact.taxonomy import FINE_NAMES, IGNORE_INDEX, NUM_FINE, VALID_MASK_VALUES

REAL_SHARE_PERCENT = {
    "Clean": 88.6,
    "Material loss": 3.3,
    "Peel": 4.4,
    "Dust": 0.027,
    "Scratch": 0.2,
    "Hair": 0.0065,
    "Dirt": 0.27,
    "Fold": 0.78,
    "Writing": 0.08,
    "Cracks": 0.57,
    "Staining": 0.94,
    "Stamp": 0.044,
    "Sticker": 0.11,
    "Puncture": 0.022,
    "Burn marks": 0.0014,
    "Lightleak": 0.65,
}
"""Each fine class's share of ARTeFACT's labelled pixels (FACTS.md, "Class frequencies (real data)")."""


def _folder_arrays(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    with (root / "metadata.csv").open(newline="", encoding="utf-8") as handle:
        ids = [row["id"] for row in csv.DictReader(handle)]
    arrays = {}
    for sample_id in ids:
        with (
            Image.open(root / "images" / f"{sample_id}.png") as image,
            Image.open(root / "annotations" / f"{sample_id}.png") as mask,
        ):
            assert image.mode == "RGB"
            assert mask.mode == "L"
            assert image.size == mask.size
            arrays[sample_id] = (np.asarray(image), np.asarray(mask))
    return arrays


@pytest.fixture(scope="module")
def folder48(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("synth") / "folder", count=48, seed=0)


def test_folder_layout_shapes_values_and_coverage(folder48: Path) -> None:
    with (folder48 / "metadata.csv").open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 48
    assert rows[7]["id"] == "synth_0007"
    materials = [row["material"] for row in rows]
    assert all(materials.count(material) >= 3 for material in MATERIALS)

    arrays = _folder_arrays(folder48)
    assert len(list((folder48 / "images").glob("*.png"))) == 48
    sides = set()
    classes_per_image = []
    for image, mask in arrays.values():
        assert 128 <= image.shape[0] <= 160 and 128 <= image.shape[1] <= 160
        sides.add(image.shape[:2])
        present = {int(v) for v in np.unique(mask)}
        assert present <= VALID_MASK_VALUES
        classes_per_image.append(present - {0, IGNORE_INDEX})
        artwork = mask != IGNORE_INDEX
        assert artwork.mean() > 0.5, "the artwork should fill most of the canvas"
    assert len(sides) > 10, "image sizes should vary"
    assert any(IGNORE_INDEX in np.unique(mask) for _, mask in arrays.values()), "some images need a border"
    assert all(2 <= len(found) <= 5 for found in classes_per_image)


def test_background_is_flat_and_damage_covers_a_learnable_share(folder48: Path) -> None:
    fractions = []
    for image, mask in _folder_arrays(folder48).values():
        background = mask == IGNORE_INDEX
        if background.any():
            assert len(np.unique(image[background], axis=0)) == 1, "the backdrop is one flat colour"
        artwork = ~background
        fractions.append(float((mask[artwork] > 0).mean()))
    assert 0.1 <= float(np.mean(fractions)) <= 0.35


def test_every_damage_class_appears(folder48: Path) -> None:
    seen = set()
    for _, mask in _folder_arrays(folder48).values():
        seen |= {int(v) for v in np.unique(mask)}
    assert set(range(1, NUM_FINE)) <= seen


def test_class_shares_are_within_5x_of_the_real_ones(folder48: Path) -> None:
    """The default set carries the real imbalance (Clean most of it, Burn marks a few pixels),
    so a default run exercises the class weights."""
    counts = np.zeros(256, dtype=np.int64)
    for _, mask in _folder_arrays(folder48).values():
        counts += np.bincount(mask.ravel(), minlength=256)
    shares = dict(zip(FINE_NAMES, 100 * counts[:NUM_FINE] / counts[:NUM_FINE].sum(), strict=True))
    ratios = {name: round(float(share / REAL_SHARE_PERCENT[name]), 2) for name, share in shares.items()}
    assert all(1 / 5 <= ratio <= 5 for ratio in ratios.values()), ratios
    assert shares["Burn marks"] < 0.01 and shares["Clean"] > 80


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    first = generate(tmp_path / "a", count=4, seed=3)
    second = generate(tmp_path / "b", count=4, seed=3)
    other = generate(tmp_path / "c", count=4, seed=4)
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert len(files) == 9
    for relative in files:
        assert (first / relative).read_bytes() == (second / relative).read_bytes(), relative
    assert any((first / r).read_bytes() != (other / r).read_bytes() for r in files if r.suffix == ".png")


def test_parquet_layout_round_trips(tmp_path: Path) -> None:
    folder = _folder_arrays(generate(tmp_path / "folder", count=5, seed=1))
    parquet_root = generate(tmp_path / "parquet", count=5, layout="parquet", seed=1)
    assert list((parquet_root / "data").glob("train-*.parquet"))
    samples = list(read_parquet(parquet_root))
    assert [s.id for s in samples] == list(folder)
    for sample in samples:
        image, mask = folder[sample.id]
        assert np.array_equal(np.asarray(sample.image), image)
        assert np.array_equal(np.asarray(sample.mask), mask)
        assert sample.material in MATERIALS


def test_render_is_pure_and_validates() -> None:
    image, mask = render(np.random.default_rng(5), 40, 50, "Wood", "Line art")
    again, again_mask = render(np.random.default_rng(5), 40, 50, "Wood", "Line art")
    assert image.shape == (40, 50, 3) and image.dtype == np.uint8
    assert mask.shape == (40, 50) and mask.dtype == np.uint8
    assert np.array_equal(image, again) and np.array_equal(mask, again_mask)
    with pytest.raises(UserError):
        render(np.random.default_rng(0), 40, 50, "Marble", "Line art")
    with pytest.raises(UserError):
        generate(Path("unused"), layout="zip")
