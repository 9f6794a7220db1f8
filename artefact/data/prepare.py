"""``prepare``: turn a raw source into a training cache, one image at a time.

The cache is ``images/<id>.npy`` (H x W x 3 uint8), ``masks/<id>.npy`` (H x W uint8),
``index.csv``, ``manifest.json`` and ``class_pixels.json`` (each head's labelled pixels per
class on the training side, where class weights come from). It is built in a sibling
``.partial`` folder and renamed into place only when complete, so an interrupted run never
leaves a folder that looks like a cache. Re-running with the same parameters reuses the cache.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from artefact.config import DataConfig
from artefact.data.folder import is_folder_source, read_folder
from artefact.data.parquet import read_parquet, shard_paths
from artefact.data.sample import Sample, check_mask, class_ids, decode
from artefact.data.split import GroupInfo, assign_splits
from artefact.data.synthetic import generate
from artefact.errors import UserError
from artefact.taxonomy import HEAD_CLASS_NAMES, HEAD_LUTS

MANIFEST = "manifest.json"
INDEX = "index.csv"
CLASS_PIXELS = "class_pixels.json"
CACHE_VERSION = 1
INDEX_COLUMNS = ("id", "group", "material", "content", "split", "height", "width")
AUGMENTATIONS = ("hflip", "vflip", "rot90")
SYNTHETIC_COUNT = 48


@dataclass(frozen=True)
class PrepareParams:
    """Everything that changes the cache's contents; a change means a rebuild."""

    max_side: int = 512
    val_fraction: float = 0.2
    holdout: str | None = None
    augment_copies: int = 0
    split_seed: int = 0
    max_pixels: int = 250_000_000


def is_cache(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def read_source(path: Path, max_pixels: int) -> Iterator[Sample]:
    """Dispatch on the layout: parquet shards or the folder layout."""
    if not path.exists():
        raise UserError(f"data source {path} does not exist.")
    if is_folder_source(path):
        return read_folder(path, max_pixels)
    if shard_paths(path):
        return read_parquet(path, max_pixels)
    raise UserError(
        f"{path} is neither ARTeFACT parquet shards (*.parquet), a folder with metadata.csv,"
        " images/ and annotations/, nor a prepared cache (manifest.json)."
    )


def prepare(source: Path, out: Path, params: PrepareParams, log=print) -> Path:
    """Build (or reuse) the cache for ``source`` in ``out`` and return ``out``."""
    if not source.exists():
        raise UserError(f"data source {source} does not exist.")
    fingerprint = _fingerprint(source, params)
    if is_cache(out):
        manifest = json.loads((out / MANIFEST).read_text())
        if manifest.get("fingerprint") == fingerprint:
            log(f"cache {out} is up to date ({manifest['counts']}); reusing it")
            return out
        log(f"cache {out} was built with other parameters or data; rebuilding it")
    elif out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not a cache; choose an empty or new --out folder.")

    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    (partial / "images").mkdir(parents=True)
    (partial / "masks").mkdir()
    try:
        rows = _write_samples(read_source(source, params.max_pixels), partial, params, log)
        splits = assign_splits(
            [GroupInfo(r["group"], r["material"], r["content"]) for r in rows],
            params.val_fraction,
            params.split_seed,
            params.holdout,
        )
        for row in rows:
            row["split"] = splits[row["group"]]
        rows += _augment_training_side(rows, partial, params.augment_copies)
        counts = {side: sum(r["split"] == side for r in rows) for side in ("train", "val")}
        _write_index(partial / INDEX, rows)
        _write_class_pixels(partial, _count_class_pixels(partial, rows))
        manifest = {
            "version": CACHE_VERSION,
            "fingerprint": fingerprint,
            "source": str(source),
            "params": params.__dict__,
            "counts": counts,
        }
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=2))
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(partial, out)
    log(f"prepared {out}: {counts['train']} train / {counts['val']} val images")
    return out


def _fingerprint(source: Path, params: PrepareParams) -> str:
    """Parameters plus the source files' names, sizes and mtimes: cheap and change-sensitive."""
    digest = hashlib.sha256(json.dumps([CACHE_VERSION, params.__dict__], sort_keys=True).encode())
    files = sorted(p for p in source.rglob("*") if p.is_file()) if source.is_dir() else [source]
    for path in files:
        stat = path.stat()
        digest.update(
            f"{path.relative_to(source) if source.is_dir() else path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode()
        )
    return digest.hexdigest()


def _write_samples(samples: Iterator[Sample], out: Path, params: PrepareParams, log) -> list[dict]:
    rows: list[dict] = []
    seen: set[str] = set()
    for sample in samples:
        where = f"sample {sample.id}"
        if sample.id in seen:
            raise UserError(f"{where}: the id appears twice in the source; ids must be unique.")
        seen.add(sample.id)
        check_mask(sample.mask, sample.image.size, where)
        size = bounded_size(sample.image.size, params.max_side)
        image = shrink_image(sample.image, size, where)
        np.save(out / "images" / f"{sample.id}.npy", image)
        del image
        sample.image.close()  # drop the decoded full-size image before the mask is decoded
        mask = class_ids(sample.mask, f"{where} annotation")
        mask_array = np.asarray(mask.resize(size, Image.Resampling.NEAREST) if mask.size != size else mask)
        np.save(out / "masks" / f"{sample.id}.npy", mask_array.astype(np.uint8, copy=False))
        rows.append(
            {
                "id": sample.id,
                "group": sample.group,
                "material": sample.material,
                "content": sample.content,
                "height": size[1],
                "width": size[0],
            }
        )
        if len(rows) % 50 == 0:
            log(f"  {len(rows)} images prepared")
    return rows


def bounded_size(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    width, height = size
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def shrink_image(image: Image.Image, size: tuple[int, int], where: str) -> np.ndarray:
    """Decode at reduced scale where the codec allows (JPEG draft), then box-reduce and resize.

    Each step drops the larger image before the next is made, which bounds peak memory
    to about one decoded full-size image.
    """
    image.draft("RGB", size)
    image = decode(image, where)
    if image.mode == "I;16":  # 0..65535 to 0..255; Pillow's own conversion would clip at 255
        image = image.point(lambda value: value / 256)
    if image.mode != "RGB":
        image = image.convert("RGB")
    factor = min(image.width // size[0], image.height // size[1])
    if factor >= 2:
        image = image.reduce(factor)
    if image.size != size:
        image = image.resize(size, Image.Resampling.BILINEAR)
    return np.asarray(image)


def _augment_training_side(rows: list[dict], out: Path, copies: int) -> list[dict]:
    """The seeds' offline x3 flips/rotation, written for training images only."""
    extra = []
    for row in [r for r in rows if r["split"] == "train"]:
        image = np.load(out / "images" / f"{row['id']}.npy")
        mask = np.load(out / "masks" / f"{row['id']}.npy")
        for name in AUGMENTATIONS[:copies]:
            new_id = f"{row['id']}.{name}"
            new_image, new_mask = _apply(name, image), _apply(name, mask)
            np.save(out / "images" / f"{new_id}.npy", new_image)
            np.save(out / "masks" / f"{new_id}.npy", new_mask)
            extra.append({**row, "id": new_id, "height": new_mask.shape[0], "width": new_mask.shape[1]})
    return extra


def _apply(name: str, array: np.ndarray) -> np.ndarray:
    if name == "hflip":
        return np.ascontiguousarray(array[:, ::-1])
    if name == "vflip":
        return np.ascontiguousarray(array[::-1])
    return np.ascontiguousarray(np.rot90(array))


def _write_index(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
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
    record = _count_class_pixels(cache, read_index(cache))
    try:
        _write_class_pixels(cache, record)
    except OSError:
        pass
    return record["pixels"]


def _count_class_pixels(cache: Path, rows: list[dict]) -> dict[str, object]:
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


def _write_class_pixels(cache: Path, record: dict[str, object]) -> None:
    """Written beside and renamed, so that a reader never sees half a file."""
    handle, temporary = tempfile.mkstemp(dir=cache, prefix=f".{CLASS_PIXELS}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            json.dump(record, file, indent=2)
        os.replace(temporary, cache / CLASS_PIXELS)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def params_from(cfg: DataConfig) -> PrepareParams:
    """The cache-shaping subset of the data config (same field names)."""
    return PrepareParams(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(PrepareParams)})


def cache_params(cache: Path) -> dict[str, object]:
    """The data-config fields a cache was prepared with, from its manifest."""
    return json.loads((cache / MANIFEST).read_text())["params"]


def ensure_cache(cfg: DataConfig, workspace: Path, log=print) -> Path:
    """The cache a run trains on: the given cache, a cache prepared from a raw source, or
    the built-in synthetic data set (generated on first use and reused afterwards).

    Its class pixel counts are made here if it lacks them (an older cache), once, rather
    than in each trial.
    """
    if cfg.path is None:
        source = workspace / "synthetic"
        if not is_folder_source(source):
            log(f"generating the built-in synthetic data set in {source}")
            generate(source, count=SYNTHETIC_COUNT, seed=0)
    else:
        source = Path(cfg.path).expanduser().resolve()
        if is_cache(source):
            class_pixels(source)
            return source
    params = params_from(cfg)
    key = hashlib.sha256(f"{source}:{json.dumps(params.__dict__, sort_keys=True)}".encode()).hexdigest()[:10]
    cache = prepare(source, workspace / f"cache-{source.name}-{key}", params, log)
    class_pixels(cache)
    return cache
