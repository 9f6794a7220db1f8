"""Every image mode and format the ``datasets`` library stores prepares, from parquet and from folders."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from builders import IMAGE_STRUCT
from PIL import Image

from artefact.data.prepare import PrepareParams, prepare

SIZE = (24, 32)
RNG = np.random.default_rng(3)
RGB = RNG.integers(0, 256, (*SIZE, 3), dtype=np.uint8)
GREY = RNG.integers(0, 256, SIZE, dtype=np.uint8)
IDS = RNG.choice(np.array([0, 1, 7, 15, 255], np.uint8), SIZE)
PALETTE = RNG.integers(0, 256, 768, dtype=np.uint8).tobytes()
SUFFIXES = {"PNG": ".png", "TIFF": ".tif", "JPEG": ".jpg", "WEBP": ".webp", "BMP": ".bmp"}


def datasets_bytes(image: Image.Image) -> bytes:
    """What the ``datasets`` Image feature stores for a PIL image (``image_to_bytes`` in its
    features/image.py): the image's own format where Pillow writes it, else PNG for modes 1,
    L, LA, RGB and RGBA and TIFF for any other."""
    Image.init()
    if image.format in Image.SAVE:
        kind = image.format
    else:
        kind = "PNG" if image.mode in ("1", "L", "LA", "RGB", "RGBA") else "TIFF"
    buffer = io.BytesIO()
    image.save(buffer, format=kind)
    return buffer.getvalue()


def _with_format(image: Image.Image, kind: str) -> Image.Image:
    """The image as read back from a ``kind`` file: a PIL image with a format of its own."""
    buffer = io.BytesIO()
    image.save(buffer, format=kind)
    return Image.open(buffer)


def _palette(image: Image.Image) -> Image.Image:
    """A palette image whose colours are not its indices."""
    image = image.convert("P")
    image.putpalette(PALETTE)
    return image


IMAGES: dict[str, tuple[Callable[[], Image.Image], np.ndarray | None]] = {
    # name: (the PIL image given to datasets, the RGB pixels prepare must make of it; None
    # where that is Pillow's decoding of the stored cell: lossy formats and a palette)
    "rgb": (lambda: Image.fromarray(RGB), RGB),
    "rgb-jpeg": (lambda: _with_format(Image.fromarray(RGB), "JPEG"), None),
    "rgb-webp": (lambda: _with_format(Image.fromarray(RGB), "WEBP"), None),
    "rgb-bmp": (lambda: _with_format(Image.fromarray(RGB), "BMP"), RGB),
    "rgba": (lambda: Image.fromarray(np.dstack([RGB, GREY])), RGB),
    "l": (lambda: Image.fromarray(GREY), np.dstack([GREY] * 3)),
    "p": (lambda: _palette(Image.fromarray(RGB).quantize(64)), None),
    "i16": (lambda: Image.fromarray(GREY.astype(np.uint16) * 257), np.dstack([GREY] * 3)),
    "1": (lambda: Image.fromarray(GREY > 127), np.dstack([np.where(GREY > 127, 255, 0).astype(np.uint8)] * 3)),
}
MASKS: dict[str, tuple[Callable[[], Image.Image], np.ndarray]] = {
    # name: (the PIL mask given to datasets, the class ids prepare must read from it)
    "l": (lambda: Image.fromarray(IDS), IDS),
    "p": (lambda: _palette(Image.fromarray(IDS)), IDS),
    "i16": (lambda: Image.fromarray(IDS.astype(np.uint16)), IDS),
    "i32": (lambda: Image.fromarray(IDS.astype(np.int32)), IDS),
    "1": (lambda: Image.fromarray(IDS == 1), (IDS == 1).astype(np.uint8)),
}
CASES = [(image, list(MASKS)[i % len(MASKS)]) for i, image in enumerate(IMAGES)]
"""Each image kind once and each mask kind at least once."""


def _cells() -> dict[str, tuple[bytes, bytes]]:
    """Each case's stored image and mask, by sample id."""
    return {f"{i}-{m}": (datasets_bytes(IMAGES[i][0]()), datasets_bytes(MASKS[m][0]())) for i, m in CASES}


def _format(encoded: bytes) -> str:
    with Image.open(io.BytesIO(encoded)) as image:
        return image.format


def _prepare_and_check(source: Path, cache: Path, cells: dict[str, tuple[bytes, bytes]]) -> None:
    prepare(source, cache, PrepareParams(max_side=64, val_fraction=0.3), log=lambda *_: None)
    for image, mask in CASES:
        sample = f"{image}-{mask}"
        expected = IMAGES[image][1]
        if expected is None:
            expected = np.asarray(Image.open(io.BytesIO(cells[sample][0])).convert("RGB"))
        assert np.array_equal(np.load(cache / "images" / f"{sample}.npy"), expected), sample
        assert np.array_equal(np.load(cache / "masks" / f"{sample}.npy"), MASKS[mask][1]), sample


def _shard(tmp_path: Path) -> Path:
    (tmp_path / "src" / "data").mkdir(parents=True)
    return tmp_path / "src" / "data" / "train-00000-of-00001.parquet"


def test_the_cases_hold_every_format_datasets_writes_here() -> None:
    cells = _cells()
    assert {_format(image) for image, _ in cells.values()} == set(SUFFIXES)
    assert {_format(mask) for _, mask in cells.values()} == {"PNG", "TIFF"}
    assert _format(cells["rgb-jpeg-p"][1]) == "TIFF", "datasets stores a palette mask as TIFF (the issue's case)"


def test_every_mode_prepares_from_parquet(tmp_path: Path) -> None:
    cells = _cells()
    table = pa.table(
        {
            "id": list(cells),
            "image": pa.array([{"bytes": image, "path": None} for image, _ in cells.values()], IMAGE_STRUCT),
            "annotation": pa.array([{"bytes": mask, "path": None} for _, mask in cells.values()], IMAGE_STRUCT),
            "material": ["Paper"] * len(cells),
            "content": ["Line art"] * len(cells),
        }
    )
    pq.write_table(table, _shard(tmp_path), row_group_size=4)
    _prepare_and_check(tmp_path / "src", tmp_path / "cache", cells)


def test_every_mode_prepares_from_a_folder(tmp_path: Path) -> None:
    source = tmp_path / "src"
    cells = _cells()
    for folder in ("images", "annotations"):
        (source / folder).mkdir(parents=True)
    for sample, (image, mask) in cells.items():
        (source / "images" / f"{sample}{SUFFIXES[_format(image)]}").write_bytes(image)
        (source / "annotations" / f"{sample}{SUFFIXES[_format(mask)]}").write_bytes(mask)
    (source / "metadata.csv").write_text("id,material,content\n" + "".join(f"{s},Paper,Line art\n" for s in cells))
    _prepare_and_check(source, tmp_path / "cache", cells)


def test_cells_written_by_the_datasets_library_prepare(tmp_path: Path) -> None:
    """The real library's cells are the helper's, byte for byte, and prepare."""
    import datasets  # a dev dependency: the reference this test checks the helper against

    text = datasets.Value("string")
    features = datasets.Features(
        {"id": text, "image": datasets.Image(), "annotation": datasets.Image(), "material": text, "content": text}
    )
    columns = {
        "id": [f"{i}-{m}" for i, m in CASES],
        "image": [IMAGES[i][0]() for i, _ in CASES],
        "annotation": [MASKS[m][0]() for _, m in CASES],
        "material": ["Paper"] * len(CASES),
        "content": ["Line art"] * len(CASES),
    }
    datasets.Dataset.from_dict(columns, features=features).to_parquet(str(_shard(tmp_path)))
    stored = pq.read_table(tmp_path / "src" / "data").to_pylist()
    cells = {row["id"]: (row["image"]["bytes"], row["annotation"]["bytes"]) for row in stored}
    assert cells == _cells()
    _prepare_and_check(tmp_path / "src", tmp_path / "cache", cells)
