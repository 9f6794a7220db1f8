"""The folder layout: ``images/<id>.<ext>``, ``annotations/<id>.<ext>``, ``metadata.csv``.

``<ext>`` is any suffix of a format Pillow reads (.png, .jpg, .tif, .webp, ...).
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from artefact.data.sources.sample import DEFAULT_MAX_PIXELS, Sample, check_id, open_image
from artefact.errors import UserError

METADATA = "metadata.csv"
REQUIRED_COLUMNS = ("id", "material", "content")


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
        images, masks = _by_id(root / "images"), _by_id(root / "annotations")
        for line, row in enumerate(reader, start=2):
            where = f"{metadata}:{line}"
            sample_id = check_id(row["id"], where)
            image_path = _pick(images, root / "images", sample_id, where, "image")
            mask_path = _pick(masks, root / "annotations", sample_id, where, "annotation")
            yield Sample(
                id=sample_id,
                image=open_image(image_path, str(image_path), max_pixels),
                mask=open_image(mask_path, str(mask_path), max_pixels),
                material=row["material"] or "unknown",
                content=row["content"] or "unknown",
                group=row.get("group") or sample_id,
            )


def _by_id(folder: Path) -> dict[str, list[Path]]:
    """The files in ``folder`` of a format Pillow reads, by name without the suffix: one
    listing for the whole folder, rather than a search per row."""
    readable = {suffix for suffix, kind in Image.registered_extensions().items() if kind in Image.OPEN}
    found: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if path.suffix.lower() in readable and path.is_file():
            found.setdefault(path.stem, []).append(path)
    return found


def _pick(found: dict[str, list[Path]], folder: Path, sample_id: str, where: str, what: str) -> Path:
    """The one file for ``sample_id``; two are refused, since which one is meant would be a guess."""
    paths = found.get(sample_id, [])
    if not paths:
        raise UserError(
            f"{where}: no {what} {folder}/{sample_id}.* (.png, .jpg, .tif or another format Pillow reads);"
            " add it or drop the row."
        )
    if len(paths) > 1:
        raise UserError(f"{where}: {' and '.join(map(str, paths))} are each the {what} of {sample_id}; keep one.")
    return paths[0]


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
