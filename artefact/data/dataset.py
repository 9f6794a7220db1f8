"""Datasets over a prepared cache.

Training yields random crops at the training resolution with flips and rot90
(albumentations). Validation yields whole images padded to a multiple of the resolution
with ignored pixels, so every labelled pixel is scored and the loop can tile them for
fixed-size encoders. Tensors stay uint8 here; normalisation happens on the device.
"""

from __future__ import annotations

from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from artefact.data.cache import read_index, side_rows
from artefact.errors import UserError
from artefact.taxonomy import IGNORE_INDEX

MAPS_KEPT = 4096
"""Memory-mapped samples a store keeps open: two maps each, well under Linux's default
limit of 65530 maps per process, whatever the size of the data set."""


class ArrayStore:
    """Image and mask arrays by id: memory-mapped from the cache, or all decoded in RAM.

    A memory map is opened once per id and kept (up to ``MAPS_KEPT``): opening one (two
    files, their headers, the mapping) cost ~0.4 ms, more than cropping and flipping the
    sample (perf_bench's data item). Maps are not pickled: a DataLoader worker started by
    spawn opens its own."""

    def __init__(self, cache: Path, ids: list[str], in_memory: bool) -> None:
        self.cache = cache
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._in_memory = in_memory
        if in_memory:
            self._arrays = {sample_id: self._read(sample_id, None) for sample_id in ids}

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        if not self._in_memory:
            state["_arrays"] = {}
        return state

    def _read(self, sample_id: str, mmap_mode: str | None) -> tuple[np.ndarray, np.ndarray]:
        try:
            image = np.load(self.cache / "images" / f"{sample_id}.npy", mmap_mode=mmap_mode)
            mask = np.load(self.cache / "masks" / f"{sample_id}.npy", mmap_mode=mmap_mode)
        except (OSError, ValueError) as error:
            raise UserError(f"cache {self.cache}: cannot read {sample_id} ({error}); re-run prepare.") from None
        return image, mask

    def get(self, sample_id: str) -> tuple[np.ndarray, np.ndarray]:
        if self._in_memory:
            return self._arrays[sample_id]
        arrays = self._arrays.get(sample_id)
        if arrays is None:
            if len(self._arrays) >= MAPS_KEPT:
                self._arrays.clear()
            arrays = self._arrays[sample_id] = self._read(sample_id, "r")
        return arrays


def load_split(cache: Path, split: str, fold: int | None = None) -> list[dict]:
    rows = side_rows(read_index(cache), split, fold)
    if not rows:
        where = f"fold {fold}" if fold is not None else "split"
        raise UserError(f"cache {cache} has no {split} images in its {where}; re-run prepare with other split options.")
    return rows


class TrainDataset(Dataset):
    """``crops_per_image`` random crops of every training image per epoch."""

    def __init__(
        self, cache: Path, resolution: int, crops_per_image: int = 1, in_memory: bool = False, fold: int | None = None
    ) -> None:
        self.rows = load_split(cache, "train", fold)
        self.store = ArrayStore(cache, [r["id"] for r in self.rows], in_memory)
        self.crops_per_image = crops_per_image
        self.transform = A.Compose(
            [
                # Crop first, pad only an image smaller than the crop: padding first copied
                # the whole image for every crop.
                A.RandomCrop(
                    resolution,
                    resolution,
                    pad_if_needed=True,
                    border_mode=cv2.BORDER_CONSTANT,
                    fill=0,
                    fill_mask=IGNORE_INDEX,
                ),
                A.HorizontalFlip(),
                A.VerticalFlip(),
                A.RandomRotate90(),
            ],
            # Compose keeps its own RNG and ignores the global seeds: seed it from numpy's global
            # state (set by train.seed) so that a run is reproducible.
            seed=int(np.random.randint(0, 2**31 - 1)),
        )

    def __len__(self) -> int:
        return len(self.rows) * self.crops_per_image

    def reseed(self, seed: int) -> None:
        """Called in each DataLoader worker: every worker holds a copy of the same Compose,
        which would otherwise repeat the same crops and flips in every worker."""
        self.transform.set_random_seed(seed % 2**31)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.store.get(self.rows[index % len(self.rows)]["id"])
        out = self.transform(image=np.asarray(image), mask=np.asarray(mask))
        return torch.from_numpy(np.ascontiguousarray(out["image"].transpose(2, 0, 1))), torch.from_numpy(out["mask"])


class ValDataset(Dataset):
    """Whole validation images, padded with ignored pixels to a multiple of ``resolution``."""

    def __init__(self, cache: Path, resolution: int, in_memory: bool = False, fold: int | None = None) -> None:
        self.rows = load_split(cache, "val", fold)
        self.store = ArrayStore(cache, [r["id"] for r in self.rows], in_memory)
        self.resolution = resolution
        self.materials = sorted({r["material"] for r in self.rows})

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """(image, mask, material number, ``index``): the index places the image's scores in
        the whole validation set when each DDP rank validates a shard of it."""
        row = self.rows[index]
        image, mask = self.store.get(row["id"])
        height, width = mask.shape
        padded_h = -(-height // self.resolution) * self.resolution
        padded_w = -(-width // self.resolution) * self.resolution
        padded_image = np.zeros((3, padded_h, padded_w), dtype=np.uint8)
        padded_image[:, :height, :width] = np.asarray(image).transpose(2, 0, 1)
        padded_mask = np.full((padded_h, padded_w), IGNORE_INDEX, dtype=np.uint8)
        padded_mask[:height, :width] = mask
        return (
            torch.from_numpy(padded_image),
            torch.from_numpy(padded_mask),
            self.materials.index(row["material"]),
            index,
        )
