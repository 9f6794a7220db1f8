"""Validation as it is scored: whole images, padded and cut into tiles at the training
resolution, with confusion counts per head (summed over DDP ranks) and a few predictions to
draw. ``predict`` segments new images the same way.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from artefact.metrics import confusion_matrix, iou_per_class, mean_iou
from artefact.report.figures import Prediction
from artefact.taxonomy import FINE_NAMES, HEAD_CLASS_NAMES, HEAD_LUTS, IGNORE_INDEX

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PREDICTION_IMAGES = 3
"""Validation images drawn as prediction overlays for the best epoch."""
PREVIEW_SIDE = 768
"""Longest side of an overlay image; larger validation images are subsampled."""


class Normaliser:
    """uint8 NCHW on the host -> normalised float on the device (4x less to copy)."""

    def __init__(self, device: torch.device, channels_last: bool = False) -> None:
        self.device = device
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255
        self.luts = {head: torch.from_numpy(lut).to(device) for head, lut in HEAD_LUTS.items()}

    def images(self, batch: torch.Tensor) -> torch.Tensor:
        images = (batch.to(self.device, non_blocking=True).float() - self.mean) / self.std
        return images.contiguous(memory_format=self.memory_format)

    def targets(self, masks: torch.Tensor, heads: tuple[str, ...] | list[str]) -> dict[str, torch.Tensor]:
        fine = masks.to(self.device, non_blocking=True).long()
        return {head: self.luts[head][fine].long() for head in heads}


@torch.no_grad()
def predict_tiled(model: nn.Module, image: torch.Tensor, resolution: int, chunk: int) -> dict[str, torch.Tensor]:
    """Logits for a (1, 3, H, W) image whose sides are multiples of ``resolution``.

    Non-overlapping tiles at the training resolution work for every encoder, including
    fixed-size transformers built for exactly that input size, and bound memory.
    """
    _, channels, height, width = image.shape
    rows, cols = height // resolution, width // resolution
    tiles = image.reshape(channels, rows, resolution, cols, resolution).permute(1, 3, 0, 2, 4)
    tiles = tiles.reshape(rows * cols, channels, resolution, resolution)
    outputs: dict[str, list[torch.Tensor]] = {}
    for start in range(0, tiles.shape[0], chunk):
        for head, logits in model(tiles[start : start + chunk]).items():
            outputs.setdefault(head, []).append(logits.float())
    stitched = {}
    for head, parts in outputs.items():
        logits = torch.cat(parts)
        classes = logits.shape[1]
        logits = logits.reshape(rows, cols, classes, resolution, resolution).permute(2, 0, 3, 1, 4)
        stitched[head] = logits.reshape(1, classes, height, width)
    return stitched


@torch.no_grad()
def segment(
    model: nn.Module,
    image: torch.Tensor,
    normalise: Normaliser,
    dtype: torch.dtype | None,
    resolution: int,
    chunk: int,
) -> dict[str, torch.Tensor]:
    """Logits for a uint8 (1, 3, H, W) image of any size, as validation scores them: padded
    with black (as ``ValDataset`` pads) to whole tiles, normalised, tiled, cropped back."""
    height, width = image.shape[-2:]
    padded = nn.functional.pad(image, (0, -width % resolution, 0, -height % resolution))
    with torch.autocast(normalise.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        logits = predict_tiled(model, normalise.images(padded), resolution, chunk)
    return {head: values[..., :height, :width] for head, values in logits.items()}


def class_map(logits: torch.Tensor) -> torch.Tensor:
    """The most likely class per pixel of (N, C, H, W) logits. ``max`` rather than ``argmax``:
    on the CPU, argmax over the class dimension takes ten times as long (docs/performance.md)."""
    return logits.max(1).indices


@torch.no_grad()
def validate(
    model, loader, materials, preview_ids, normalise, criterion, dtype, resolution, chunk, ranks, images
) -> tuple[dict[str, float], dict[str, torch.Tensor], np.ndarray, list[Prediction]]:
    """Metrics, confusion counts per head (summed over ranks), the fine head's counts per
    validation image (``images`` x 16 x 16, for the report's bootstrap over images) and
    predictions for the first ``PREDICTION_IMAGES`` of ``preview_ids`` (empty on ranks other than 0)."""
    model.eval()
    device = normalise.device
    heads = list(criterion.head_weights)
    confusion = {
        h: torch.zeros(len(HEAD_CLASS_NAMES[h]), len(HEAD_CLASS_NAMES[h]), dtype=torch.long, device=device)
        for h in heads
    }
    by_material = torch.zeros(len(materials), len(FINE_NAMES), len(FINE_NAMES), dtype=torch.long, device=device)
    per_image = torch.zeros(images, len(FINE_NAMES), len(FINE_NAMES), dtype=torch.long, device=device)
    loss_sum = torch.zeros(2, device=device)
    predictions: list[Prediction] = []
    for index, (image, mask, material, position) in enumerate(loader):
        targets = normalise.targets(mask, heads)
        logits = segment(model, image, normalise, dtype, resolution, chunk)
        loss, _ = criterion(logits, targets)
        loss_sum += torch.stack([loss, torch.ones((), device=device)])
        predicted = {head: class_map(values) for head, values in logits.items()}
        for head in heads:
            cm = confusion_matrix(predicted[head], targets[head], len(HEAD_CLASS_NAMES[head]))
            confusion[head] += cm
            if head == "fine":
                by_material[int(material)] += cm
                per_image[int(position)] = cm
        if index < min(PREDICTION_IMAGES, len(preview_ids)):
            predictions.append(_preview(preview_ids[index], image[0], mask[0], predicted["fine"][0]))
    if ranks.distributed:
        for cm in (*confusion.values(), by_material, per_image, loss_sum):
            dist.all_reduce(cm)
    metrics = {"val/loss": (loss_sum[0] / loss_sum[1].clamp_min(1)).item()}
    for head in heads:
        metrics[f"val/miou_{head}"] = mean_iou(confusion[head])
    for name, iou in zip(FINE_NAMES, iou_per_class(confusion["fine"]).tolist(), strict=True):
        if not math.isnan(iou):
            metrics[f"val/iou/{name}"] = iou
    for name, cm in zip(materials, by_material, strict=True):
        if cm.sum() > 0:
            metrics[f"val/miou_fine_by_material/{name}"] = mean_iou(cm)
    return metrics, confusion, per_image.cpu().numpy(), predictions


def _preview(sample_id: str, image: torch.Tensor, truth: torch.Tensor, predicted: torch.Tensor) -> Prediction:
    """A subsampled host copy of one validation image, its truth and its prediction, without
    the padding that ``ValDataset`` added (zero pixels, ignored labels)."""
    content = (truth != IGNORE_INDEX) | (image.amax(0) > 0)
    rows, cols = content.any(1).nonzero(), content.any(0).nonzero()
    height = int(rows.max()) + 1 if len(rows) else truth.shape[0]
    width = int(cols.max()) + 1 if len(cols) else truth.shape[1]
    image, truth, predicted = image[:, :height, :width], truth[:height, :width], predicted[:height, :width]
    step = max(1, math.ceil(max(height, width) / PREVIEW_SIDE))
    return Prediction(
        sample_id,
        image[:, ::step, ::step].permute(1, 2, 0).cpu().numpy(),
        truth[::step, ::step].cpu().numpy().astype(np.uint8),
        predicted[::step, ::step].cpu().numpy().astype(np.uint8),
    )
