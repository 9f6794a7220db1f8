"""Dice loss and IoU metrics against values computed by hand, with the ignore index."""

from __future__ import annotations

import math

import pytest
import torch

from artefact.losses import dice_loss, multitask_loss
from artefact.metrics import confusion_matrix, iou_per_class, mean_iou

IGNORE = 255


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _example() -> tuple[torch.Tensor, torch.Tensor]:
    # Two classes on a 2x2 image; the bottom-right pixel is Background (ignored).
    logits = torch.tensor([[[[2.0, 0.0], [1.0, 5.0]], [[0.0, 1.0], [3.0, -5.0]]]], requires_grad=True)
    target = torch.tensor([[[0, 1], [1, IGNORE]]])
    return logits, target


def test_dice_by_hand_with_the_ignore_index() -> None:
    logits, target = _example()
    # Softmax over two classes: p1 = sigmoid(l1 - l0) at the three labelled pixels.
    p1 = [_sigmoid(0 - 2), _sigmoid(1 - 0), _sigmoid(3 - 1)]
    p0 = [1 - p for p in p1]
    dice0 = 2 * p0[0] / (sum(p0) + 1)  # class 0 is the truth at pixel (0, 0) only
    dice1 = 2 * (p1[1] + p1[2]) / (sum(p1) + 2)  # class 1 at (0, 1) and (1, 0)
    expected = 1 - (dice0 + dice1) / 2
    loss = dice_loss(logits, target)
    assert loss.item() == pytest.approx(expected, rel=1e-6)

    loss.backward()
    assert torch.all(logits.grad[0, :, 1, 1] == 0), "an ignored pixel gets no gradient"
    assert torch.all(logits.grad[0, :, 0, 0] != 0)


def test_ignored_pixel_logits_do_not_matter() -> None:
    logits, target = _example()
    changed = logits.detach().clone()
    changed[0, :, 1, 1] = torch.tensor([-40.0, 40.0])
    assert dice_loss(changed, target).item() == pytest.approx(dice_loss(logits, target).item(), abs=1e-7)


def test_classes_absent_from_the_target_are_not_averaged() -> None:
    logits = torch.tensor([[[[1.0, 2.0]], [[0.0, 0.0]], [[0.5, -1.0]]]])  # 3 classes, 1x2 image
    target = torch.tensor([[[0, 0]]])
    p0 = [math.exp(1) / (math.exp(1) + 1 + math.exp(0.5)), math.exp(2) / (math.exp(2) + 1 + math.exp(-1))]
    expected = 1 - 2 * sum(p0) / (sum(p0) + 2)
    assert dice_loss(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_perfect_prediction_and_all_ignored() -> None:
    target = torch.tensor([[[0, 1], [2, IGNORE]]])
    logits = torch.full((1, 3, 2, 2), -30.0)
    for cls, (y, x) in zip((0, 1, 2), ((0, 0), (0, 1), (1, 0)), strict=True):
        logits[0, cls, y, x] = 30.0
    assert dice_loss(logits, target).item() == pytest.approx(0.0, abs=1e-6)

    free = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss = dice_loss(free, torch.full((1, 2, 2), IGNORE))
    assert loss.item() == 0.0
    loss.backward()  # still part of the graph, with zero gradient
    assert torch.all(free.grad == 0)


def test_multitask_loss_is_the_weighted_sum() -> None:
    torch.manual_seed(0)
    outputs = {"binary": torch.randn(2, 2, 4, 4), "fine": torch.randn(2, 16, 4, 4)}
    fine = torch.randint(0, 16, (2, 4, 4))
    fine[0, 0] = IGNORE
    targets = {"binary": torch.where(fine == IGNORE, IGNORE, (fine > 0).long()), "fine": fine}
    total, per_head = multitask_loss(outputs, targets, {"binary": 0.25, "fine": 0.75})
    assert set(per_head) == {"binary", "fine"}
    assert per_head["fine"].item() == pytest.approx(dice_loss(outputs["fine"], fine).item())
    assert total.item() == pytest.approx(0.25 * per_head["binary"].item() + 0.75 * per_head["fine"].item())


def test_confusion_matrix_and_iou_by_hand() -> None:
    pred = torch.tensor([[0, 1, 2], [1, 1, 0]])
    target = torch.tensor([[0, 1, IGNORE], [2, 1, 0]])
    cm = confusion_matrix(pred, target, 4)
    assert cm.tolist() == [
        [2, 0, 0, 0],  # truth 0
        [0, 2, 0, 0],  # truth 1
        [0, 1, 0, 0],  # truth 2, predicted 1
        [0, 0, 0, 0],  # class 3 absent; the prediction 2 on the ignored pixel is not counted
    ]
    iou = iou_per_class(cm)
    assert iou[:3].tolist() == pytest.approx([1.0, 2 / 3, 0.0])
    assert math.isnan(iou[3].item()), "a class in neither truth nor prediction is NaN, not 0"
    assert mean_iou(cm) == pytest.approx((1 + 2 / 3 + 0) / 3)


def test_a_predicted_but_absent_class_scores_zero() -> None:
    pred = torch.tensor([[0, 3]])
    target = torch.tensor([[0, 0]])
    iou = iou_per_class(confusion_matrix(pred, target, 4))
    assert iou[0].item() == pytest.approx(0.5)
    assert iou[3].item() == 0.0
    assert math.isnan(iou[1].item()) and math.isnan(iou[2].item())
    assert mean_iou(confusion_matrix(pred, target, 4)) == pytest.approx(0.25)


def test_mean_iou_of_nothing_is_zero() -> None:
    cm = confusion_matrix(torch.tensor([[1]]), torch.tensor([[IGNORE]]), 3)
    assert cm.sum() == 0
    assert mean_iou(cm) == 0.0


def test_counts_sum_across_batches() -> None:
    generator = torch.Generator().manual_seed(3)
    pred = torch.randint(0, 5, (6, 9, 11), generator=generator)
    target = torch.randint(0, 5, (6, 9, 11), generator=generator)
    target[torch.rand(target.shape, generator=generator) < 0.2] = IGNORE
    whole = confusion_matrix(pred, target, 5)
    parts = confusion_matrix(pred[:2], target[:2], 5) + confusion_matrix(pred[2:], target[2:], 5)
    assert torch.equal(whole, parts)
    assert whole.sum().item() == int((target != IGNORE).sum())
    assert whole.dtype == torch.int64
    # The metric is the IoU of the summed counts, not the mean of per-batch IoUs.
    assert mean_iou(parts) == pytest.approx(mean_iou(whole))
