"""Weighted multi-task Dice loss that honours the ignore index on every head."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from artefact.taxonomy import IGNORE_INDEX


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """1 - mean soft Dice over the classes present in the target's labelled pixels.

    Ignored pixels contribute neither prediction nor truth. Averaging only over present
    classes keeps rare damage classes from being diluted by the classes a batch lacks.
    """
    num_classes = logits.shape[1]
    valid = (target != IGNORE_INDEX).unsqueeze(1)
    probs = torch.softmax(logits.float(), dim=1) * valid
    truth = F.one_hot(torch.where(valid.squeeze(1), target, 0).long(), num_classes).permute(0, 3, 1, 2) * valid
    dims = (0, 2, 3)
    intersection = (probs * truth).sum(dims)
    cardinality = probs.sum(dims) + truth.sum(dims)
    present = truth.sum(dims) > 0
    if not present.any():
        return probs.sum() * 0.0
    dice = 2.0 * intersection / cardinality.clamp_min(eps)
    return 1.0 - dice[present].mean()


def multitask_loss(
    outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor], weights: dict[str, float]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """sum_h w_h * Dice_h, plus the per-head losses for reporting."""
    per_head = {head: dice_loss(outputs[head], targets[head]) for head in weights}
    total = sum(weights[head] * loss for head, loss in per_head.items())
    return total, per_head
