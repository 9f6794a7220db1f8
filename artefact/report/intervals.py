"""How sure one encoder's score is: a 95% interval for its fine mIoU by bootstrap over
validation images. Images, not pixels, are resampled: neighbouring pixels share a painting,
its damage and its lighting, and resampling them as if independent gives intervals far too
narrow. Each trial keeps its best epoch's confusion counts per image beside its checkpoint
(``VAL_IMAGES_FILE``).

The interval is the normal one, the score ± z bootstrap standard errors, not the bootstrap's
percentiles: a resample that misses the few images of a rare class drops that class (and its
low IoU) from the mean, so resampled mIoUs sit above the score; on the synthetic set the
percentile interval put an encoder's score at its very edge (docs/performance.md).
"""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np

from artefact.report.trials import TrialSummary
from artefact.train.checkpoint import VAL_IMAGES_FILE

ROUNDS = 2000


def per_image_counts(summary: TrialSummary) -> np.ndarray | None:
    """The trial's best epoch's fine confusion counts per validation image (images x C x C),
    None where its checkpoint has none (an earlier version, or a trial that never validated)."""
    if not summary.best_checkpoint:
        return None
    path = Path(summary.best_checkpoint) / VAL_IMAGES_FILE
    return np.load(path) if path.is_file() else None


def batch_miou(confusion: np.ndarray) -> np.ndarray:
    """``metrics.mean_iou`` over the last two axes: the mean IoU of the classes seen in truth
    or prediction, 0.0 where none are."""
    confusion = confusion.astype(np.float64)
    tp = np.diagonal(confusion, axis1=-2, axis2=-1)
    union = confusion.sum(-2) + confusion.sum(-1) - tp
    seen = union > 0
    iou = np.divide(tp, union, out=np.zeros_like(tp), where=seen)
    counted = seen.sum(-1)
    return np.divide(iou.sum(-1), counted, out=np.zeros(iou.shape[:-1]), where=counted > 0)


def image_interval(
    trials: list[tuple[object, np.ndarray]], confidence: float = 0.95, rounds: int = ROUNDS
) -> tuple[float, float]:
    """Interval of the trials' mean fine mIoU, clipped to [0, 1]. ``trials``: (fold, counts per
    image). Trials on one fold validated the same images (seeds), so each round draws one
    resample of a fold's images and scores all its trials on it; folds are drawn independently."""
    draw = np.random.default_rng(0)
    weights: dict[object, np.ndarray] = {}
    for fold, counts in trials:
        images = counts.shape[0]
        if fold not in weights:
            weights[fold] = draw.multinomial(images, np.full(images, 1 / images), size=rounds)
    scores = np.mean([batch_miou(np.einsum("ri,ijk->rjk", weights[fold], counts)) for fold, counts in trials], axis=0)
    score = float(np.mean([batch_miou(counts.sum(0)) for _, counts in trials]))
    spread = statistics.NormalDist().inv_cdf((1 + confidence) / 2) * float(np.std(scores))
    return max(0.0, score - spread), min(1.0, score + spread)


def encoder_interval(trials: list[TrialSummary]) -> tuple[float, float] | None:
    """The interval of these trials' mean score; None unless every trial kept its per-image
    counts (an interval over some of them would not be around the mean shown beside it)."""
    kept = [(trial.params.get("fold"), per_image_counts(trial)) for trial in trials]
    return image_interval(kept) if all(counts is not None for _, counts in kept) else None
