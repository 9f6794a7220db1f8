"""The prepared cache: the one contract between ``prepare``, which writes it, and the
datasets and the loss, which read it.

A cache is ``images/<id>.npy`` (H x W x 3 uint8), ``masks/<id>.npy`` (H x W uint8),
``index.csv`` (one row per image: group, material, content, split, fold, the image an
offline augmented copy was made from, size), ``manifest.json`` (the parameters it was prepared
with, a fingerprint of its source, the folds' names) and ``class_pixels.json`` (each head's
labelled pixels per class on the training side, of the split and of every fold, where class
weights come from).

A row trains or validates by ``split`` (``data.fold`` unset) or by its ``fold`` (the fold
that validates it; every other fold trains on it). A copy is never validated, so copies of
every image can be kept and each stays on the training sides of its source image.
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
CACHE_VERSION = 2
INDEX_COLUMNS = ("id", "group", "material", "content", "split", "fold", "copy_of", "height", "width")


@dataclass(frozen=True)
class PrepareParams:
    """Everything that changes the cache's contents, recorded in its manifest; a change means
    a rebuild. The defaults are ``DataConfig``'s, where every data default is written."""

    max_side: int = DataConfig.max_side
    val_fraction: float = DataConfig.val_fraction
    holdout: str | None = DataConfig.holdout
    augment_copies: int = DataConfig.augment_copies
    split_seed: int = DataConfig.split_seed
    cv: str | None = DataConfig.cv
    max_pixels: int = DataConfig.max_pixels


def is_cache(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def write_index(cache: Path, rows: list[dict]) -> None:
    with (cache / INDEX).open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(INDEX_COLUMNS))
        writer.writeheader()
        for row in rows:
            writer.writerow({key: "" if row.get(key) is None else row[key] for key in INDEX_COLUMNS})


def read_index(cache: Path) -> list[dict]:
    """The cache's rows, with height and width as ints and fold as an int or None (a version 1
    cache has no folds and copies of training images only)."""
    if not is_cache(cache):
        raise UserError(f"{cache} is not a prepared cache (no {MANIFEST}); run `python -m artefact prepare`.")
    with (cache / INDEX).open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        row["height"], row["width"] = int(row["height"]), int(row["width"])
        row["fold"] = int(row["fold"]) if row.get("fold") else None
        row["copy_of"] = row.get("copy_of") or ""
    return rows


def side_rows(rows: list[dict], side: str, fold: int | None = None) -> list[dict]:
    """The rows that train (``side='train'``) or validate: by the split, or by ``fold``."""
    if fold is None:
        chosen = [row for row in rows if row["split"] == side]
    else:
        chosen = [row for row in rows if (row["fold"] == fold) == (side == "val")]
    return chosen if side == "train" else [row for row in chosen if not row["copy_of"]]


def fold_names(cache: Path) -> list[str]:
    """Each fold's name (what it holds out), in fold order; empty for a cache without folds."""
    return json.loads((cache / MANIFEST).read_text()).get("folds", [])


def check_fold(cache: Path, fold: int | None) -> None:
    """A run's ``data.fold`` must be one of its cache's folds."""
    folds = len(fold_names(cache))
    if fold is not None and fold >= folds:
        kinds = f"folds 0 to {folds - 1}" if folds else "no folds (prepare it with --cv)"
        raise UserError(f"data.fold = {fold}: the cache {cache} has {kinds}.")


def fold_sizes(cache: Path) -> list[dict[str, object]]:
    """Each fold: its number, what it holds out, and its training and validation images."""
    rows = read_index(cache)
    return [
        {
            "fold": fold,
            "held_out": name,
            "train_images": len(side_rows(rows, "train", fold)),
            "val_images": len(side_rows(rows, "val", fold)),
        }
        for fold, name in enumerate(fold_names(cache))
    ]


def class_pixels(cache: Path, fold: int | None = None) -> dict[str, list[int]]:
    """Each head's labelled pixels per class id on the training side only: of the split, or
    of ``fold``.

    A cache prepared before these were stored gets them counted now, and saved if it can be
    written (a read-only one is counted again next time).
    """
    path = cache / CLASS_PIXELS
    record = json.loads(path.read_text()) if path.is_file() else None
    if record is None:
        record = count_class_pixels(cache, read_index(cache))
        try:
            write_class_pixels(cache, record)
        except OSError:
            pass
    if fold is None:
        return record["pixels"]
    check_fold(cache, fold)
    return record["folds"][str(fold)]


def count_class_pixels(cache: Path, rows: list[dict]) -> dict[str, object]:
    """Per head, via the taxonomy's lookup tables, over the training rows (offline augmented
    copies included) of the split and of each fold, reading each mask once: a
    validation-only class gets no pixels here."""
    fine_per_row = {
        row["id"]: np.bincount(np.load(cache / "masks" / f"{row['id']}.npy").ravel(), minlength=256)
        for row in rows
        if row["split"] == "train" or row["fold"] is not None
    }

    def pixels(training: list[dict]) -> dict[str, list[int]]:
        fine = sum((fine_per_row[row["id"]] for row in training), np.zeros(256, dtype=np.int64))
        return {
            head: [int(fine[HEAD_LUTS[head] == class_id].sum()) for class_id in range(len(names))]
            for head, names in HEAD_CLASS_NAMES.items()
        }

    training = side_rows(rows, "train")
    folds = sorted({row["fold"] for row in rows if row["fold"] is not None})
    record: dict[str, object] = {"side": "train", "images": len(training), "pixels": pixels(training)}
    if folds:
        record["folds"] = {str(fold): pixels(side_rows(rows, "train", fold)) for fold in folds}
    return record


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
