"""The folder layout: ``images/<id>.<ext>``, ``annotations/<id>.png``, ``metadata.csv``."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from artefact.data.sources.sample import DEFAULT_MAX_PIXELS, Sample, check_id, open_image
from artefact.errors import UserError

METADATA = "metadata.csv"
REQUIRED_COLUMNS = ("id", "material", "content")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp")


def is_folder_source(path: Path) -> bool:
    return (path / METADATA).is_file()


def read_folder(root: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[Sample]:
    """Yield the samples listed in ``metadata.csv``, opening each image lazily."""
    metadata = root / METADATA
    with metadata.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise UserError(
                f"{metadata}: missing column(s) {missing}; the header must include"
                f" {', '.join(REQUIRED_COLUMNS)} (optional: group)."
            )
        for line, row in enumerate(reader, start=2):
            where = f"{metadata}:{line}"
            sample_id = check_id(row["id"], where)
            image_path = _find_image(root / "images", sample_id, where)
            mask_path = root / "annotations" / f"{sample_id}.png"
            if not mask_path.is_file():
                raise UserError(f"{where}: annotation {mask_path} is missing; add it or drop the row.")
            yield Sample(
                id=sample_id,
                image=open_image(image_path, str(image_path), max_pixels),
                mask=open_image(mask_path, str(mask_path), max_pixels),
                material=row["material"] or "unknown",
                content=row["content"] or "unknown",
                group=row.get("group") or sample_id,
            )


def _find_image(folder: Path, sample_id: str, where: str) -> Path:
    for suffix in IMAGE_SUFFIXES:
        candidate = folder / f"{sample_id}{suffix}"
        if candidate.is_file():
            return candidate
    raise UserError(f"{where}: no image {folder}/{sample_id}.* ({'/'.join(IMAGE_SUFFIXES)}); add it or drop the row.")


class FolderWriter:
    """Writes samples in the folder layout, for the synthetic generator and exports."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        self._rows: list[dict[str, str]] = []

    def add(self, sample_id: str, image: Image.Image, mask: Image.Image, material: str, content: str) -> None:
        check_id(sample_id, str(self.root))
        image.save(self.root / "images" / f"{sample_id}.png")
        mask.save(self.root / "annotations" / f"{sample_id}.png")
        self._rows.append({"id": sample_id, "material": material, "content": content})

    def close(self) -> None:
        """Write metadata.csv last: a folder without it is not a source."""
        with (self.root / METADATA).open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(REQUIRED_COLUMNS))
            writer.writeheader()
            writer.writerows(self._rows)
