"""Per-head segmentation losses (Dice, + cross-entropy or focal) with per-class weights,
honouring the ignore index on every head."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from artefact.taxonomy import IGNORE_INDEX

FOCAL_GAMMA = 2.0


def class_weights(pixels: Sequence[int], scheme: str, clip: tuple[float, float]) -> list[float]:
    """Per-class loss weights from the training side's pixel counts (``LossConfig.class_weights``).

    With f the class's share of the counted pixels, w = 1/f (inverse_freq), 1/sqrt(f)
    (inverse_sqrt) or log1p(1/sqrt(f)) (inverse_sqrt_log, the seeds' recipe without their x10
    before the clip), normalised to mean 1 over the classes with pixels, then clipped. A class
    without training pixels gets 0: nothing in training speaks for it, so the loss does not
    weigh it (in validation either), whatever the validation side holds. ``none`` is all ones.
    """
    if scheme == "none":
        return [1.0] * len(pixels)
    total = sum(pixels)
    shares = [count / total if total else 0.0 for count in pixels]
    transform = {
        "inverse_freq": lambda f: 1 / f,
        "inverse_sqrt": lambda f: 1 / math.sqrt(f),
        "inverse_sqrt_log": lambda f: math.log1p(1 / math.sqrt(f)),
    }[scheme]
    raw = [transform(f) if f > 0 else 0.0 for f in shares]
    seen = [w for w in raw if w > 0]
    mean = sum(seen) / len(seen) if seen else 1.0
    low, high = clip
    return [min(max(w / mean, low), high) if w > 0 else 0.0 for w in raw]


def dice_loss(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-7
) -> torch.Tensor:
    """1 - soft Dice, averaged (``weight``-weighted) over the classes present in the target's labelled pixels.

    Ignored pixels contribute neither prediction nor truth. Averaging only over present
    classes keeps rare damage classes from being diluted by the classes a batch lacks; SMP's
    DiceLoss averages over all classes instead, so it is ours x (sum of weights of present
    classes) / (sum of all weights) (a test pins this).
    """
    num_classes = logits.shape[1]
    valid = target != IGNORE_INDEX
    probs = torch.softmax(logits.float(), dim=1) * valid.unsqueeze(1)
    # The truth as a boolean mask per class (ignored pixels match no class): an eighth of an
    # int64 one-hot's memory, and summed as exactly (and repeatably) as the one-hot was, which
    # a scatter of each pixel into its class (index_add) is not: float32 adds one pixel at a
    # time, 2% off at 12 M pixels of a class (docs/performance.md).
    truth = target.unsqueeze(1) == torch.arange(num_classes, device=target.device).view(1, -1, 1, 1)
    dims = (0, 2, 3)
    intersection = (probs * truth).sum(dims)
    truth_pixels = truth.sum(dims)
    cardinality = probs.sum(dims) + truth_pixels
    present = (truth_pixels > 0).float()
    if weight is not None:
        present = present * weight
    dice = 2.0 * intersection / cardinality.clamp_min(eps)
    score = (dice * present).sum() / present.sum().clamp_min(eps)
    # No class present (or weighted): 0, with a gradient of 0. Chosen on the device: a Python
    # ``if`` would wait for the GPU at every step.
    return torch.where(present.sum() > 0, 1.0 - score, probs.sum() * 0.0)


def focal_loss(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None, gamma: float = FOCAL_GAMMA
) -> torch.Tensor:
    """Softmax focal loss, the mean over labelled pixels of (1 - p_t)^gamma * -log p_t, each
    pixel weighted by its class's ``weight`` (alpha); gamma = 0 is cross-entropy with
    ``F.cross_entropy(weight=, ignore_index=255)``'s weighted mean.

    SMP's multiclass FocalLoss is another loss: a sigmoid one-vs-rest focal term per class,
    averaged over the classes. A batch without labelled (or weighted) pixels gives 0, not
    the NaN of ``F.cross_entropy``: a crop of Clean and Background only has no coarse labels.
    """
    logits = logits.float()
    valid = target != IGNORE_INDEX
    nll = F.cross_entropy(logits, target.long(), reduction="none", ignore_index=IGNORE_INDEX)
    if gamma:
        nll = (1 - torch.exp(-nll)).pow(gamma) * nll
    pixel_weight = valid.float() if weight is None else weight[torch.where(valid, target, 0).long()] * valid
    return (nll * pixel_weight).sum() / pixel_weight.sum().clamp_min(1e-12)


@dataclass(frozen=True)
class MultitaskLoss:
    """sum_h w_h * loss_h over the model's heads: Dice, plus cross-entropy (``dice_ce``) or focal
    (``dice_focal``), each with the head's per-class weights (None: unweighted)."""

    head_weights: dict[str, float]
    kind: str = "dice"
    class_weights: dict[str, torch.Tensor] | None = None

    def head_loss(self, head: str, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        weight = self.class_weights[head] if self.class_weights is not None else None
        loss = dice_loss(logits, target, weight)
        if self.kind == "dice_ce":
            loss = loss + focal_loss(logits, target, weight, gamma=0.0)
        elif self.kind == "dice_focal":
            loss = loss + focal_loss(logits, target, weight)
        return loss

    def __call__(
        self, outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted total, plus the per-head losses for reporting."""
        per_head = {head: self.head_loss(head, outputs[head], targets[head]) for head in self.head_weights}
        total = sum(self.head_weights[head] * loss for head, loss in per_head.items())
        return total, per_head
