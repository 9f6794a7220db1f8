"""``prepare``: turn a raw source into a training cache (``cache``), one image at a time.

The cache is built in a sibling ``.partial`` folder and renamed into place only when
complete, so an interrupted run never leaves a folder that looks like a cache. Re-running
with the same parameters reuses the cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from artefact.config import DataConfig
from artefact.data.cache import (
    CACHE_VERSION,
    MANIFEST,
    PrepareParams,
    class_pixels,
    count_class_pixels,
    fold_sizes,
    is_cache,
    side_rows,
    write_class_pixels,
    write_index,
)
from artefact.data.sources.folder import is_folder_source, read_folder
from artefact.data.sources.parquet import read_parquet, shard_paths
from artefact.data.sources.sample import Sample, check_mask, class_ids, decode
from artefact.data.sources.synthetic import generate
from artefact.data.split import GroupInfo, assign_folds, assign_splits
from artefact.errors import UserError

AUGMENTATIONS = ("hflip", "vflip", "rot90")


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
        groups = [GroupInfo(r["group"], r["material"], r["content"]) for r in rows]
        splits = assign_splits(groups, params.val_fraction, params.split_seed, params.holdout)
        folds, names = assign_folds(groups, params.cv, params.split_seed) if params.cv else ({}, [])
        for row in rows:
            row["split"], row["fold"], row["copy_of"] = splits[row["group"]], folds.get(row["group"]), ""
        # With folds every image trains somewhere, so every image gets its copies.
        originals = rows if folds else [row for row in rows if row["split"] == "train"]
        rows += _augment(originals, partial, params.augment_copies)
        counts = {side: len(side_rows(rows, side)) for side in ("train", "val")}
        write_index(partial, rows)
        write_class_pixels(partial, count_class_pixels(partial, rows))
        manifest = {
            "version": CACHE_VERSION,
            "fingerprint": fingerprint,
            "source": str(source),
            "params": params.__dict__,
            "counts": counts,
            "folds": names,
        }
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=2))
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(partial, out)
    log(f"prepared {out}: {counts['train']} train / {counts['val']} val images")
    for fold in fold_sizes(out):
        sizes = f"{fold['train_images']} train / {fold['val_images']} val images"
        log(f"  fold {fold['fold']} holds out {fold['held_out']}: {sizes}")
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


def _augment(rows: list[dict], out: Path, copies: int) -> list[dict]:
    """The seeds' offline x3 flips/rotation of ``rows``, each marked as a copy of its image."""
    extra = []
    for row in rows:
        image = np.load(out / "images" / f"{row['id']}.npy")
        mask = np.load(out / "masks" / f"{row['id']}.npy")
        for name in AUGMENTATIONS[:copies]:
            new_id = f"{row['id']}.{name}"
            new_image, new_mask = _apply(name, image), _apply(name, mask)
            np.save(out / "images" / f"{new_id}.npy", new_image)
            np.save(out / "masks" / f"{new_id}.npy", new_mask)
            extra.append(
                {**row, "id": new_id, "copy_of": row["id"], "height": new_mask.shape[0], "width": new_mask.shape[1]}
            )
    return extra


def _apply(name: str, array: np.ndarray) -> np.ndarray:
    if name == "hflip":
        return np.ascontiguousarray(array[:, ::-1])
    if name == "vflip":
        return np.ascontiguousarray(array[::-1])
    return np.ascontiguousarray(np.rot90(array))


def params_from(cfg: DataConfig) -> PrepareParams:
    """The cache-shaping subset of the data config (same field names)."""
    return PrepareParams(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(PrepareParams)})


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
            generate(source, seed=0)
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
