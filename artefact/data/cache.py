"""The prepared cache: the one contract between ``prepare``, which writes it, and the
datasets and the loss, which read it.

A cache is ``images/<id>.npy`` (H x W x 3 uint8), ``masks/<id>.npy`` (H x W uint8),
``index.csv`` (one row per image: group, material, content, split, size), ``manifest.json``
(the parameters it was prepared with, a fingerprint of its source) and ``class_pixels.json``
(each head's labelled pixels per class on the training side, where class weights come from).
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from artefact.config import DataConfig
from artefact.errors import UserError
from artefact.taxonomy import HEAD_CLASS_NAMES, HEAD_LUTS

MANIFEST = "manifest.json"
INDEX = "index.csv"
CLASS_PIXELS = "class_pixels.json"
CACHE_VERSION = 1
INDEX_COLUMNS = ("id", "group", "material", "content", "split", "height", "width")


@dataclass(frozen=True)
class PrepareParams:
    """Everything that changes the cache's contents, recorded in its manifest; a change means
    a rebuild. The defaults are ``DataConfig``'s, where every data default is written."""

    max_side: int = DataConfig.max_side
    val_fraction: float = DataConfig.val_fraction
    holdout: str | None = DataConfig.holdout
    augment_copies: int = DataConfig.augment_copies
    split_seed: int = DataConfig.split_seed
    max_pixels: int = DataConfig.max_pixels


def is_cache(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def write_index(cache: Path, rows: list[dict]) -> None:
    with (cache / INDEX).open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(INDEX_COLUMNS))
        writer.writeheader()
        for row in rows:
            writer.writerow({key: row[key] for key in INDEX_COLUMNS})


def read_index(cache: Path) -> list[dict]:
    """The cache's rows, with height and width as ints."""
    if not is_cache(cache):
        raise UserError(f"{cache} is not a prepared cache (no {MANIFEST}); run `python -m artefact prepare`.")
    with (cache / INDEX).open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        row["height"], row["width"] = int(row["height"]), int(row["width"])
    return rows


def class_pixels(cache: Path) -> dict[str, list[int]]:
    """Each head's labelled pixels per class id on the cache's training side only.

    A cache prepared before these were stored gets them counted now, and saved if it can be
    written (a read-only one is counted again next time).
    """
    path = cache / CLASS_PIXELS
    if path.is_file():
        return json.loads(path.read_text())["pixels"]
    record = count_class_pixels(cache, read_index(cache))
    try:
        write_class_pixels(cache, record)
    except OSError:
        pass
    return record["pixels"]


def count_class_pixels(cache: Path, rows: list[dict]) -> dict[str, object]:
    """Per head, via the taxonomy's lookup tables, over the training rows (offline augmented
    copies included), one mask at a time: a validation-only class gets no pixels here."""
    fine = np.zeros(256, dtype=np.int64)
    images = 0
    for row in rows:
        if row["split"] == "train":
            fine += np.bincount(np.load(cache / "masks" / f"{row['id']}.npy").ravel(), minlength=256)
            images += 1
    pixels = {
        head: [int(fine[HEAD_LUTS[head] == class_id].sum()) for class_id in range(len(names))]
        for head, names in HEAD_CLASS_NAMES.items()
    }
    return {"side": "train", "images": images, "pixels": pixels}


def write_class_pixels(cache: Path, record: dict[str, object]) -> None:
    """Written beside and renamed, so that a reader never sees half a file."""
    handle, temporary = tempfile.mkstemp(dir=cache, prefix=f".{CLASS_PIXELS}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            json.dump(record, file, indent=2)
        os.replace(temporary, cache / CLASS_PIXELS)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def cache_params(cache: Path) -> dict[str, object]:
    """The data-config fields a cache was prepared with, from its manifest."""
    return json.loads((cache / MANIFEST).read_text())["params"]
