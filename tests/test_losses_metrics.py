"""Losses (Dice, + cross-entropy or focal, class weights) and IoU metrics against values computed
by hand or by SMP and PyTorch, with the ignore index."""

from __future__ import annotations

import math

import pytest
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F

from artefact.losses import MultitaskLoss, class_weights, dice_loss, focal_loss
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


@pytest.mark.parametrize("kind", ["dice", "dice_ce", "dice_focal"])
def test_multitask_loss_is_the_weighted_sum(kind: str) -> None:
    torch.manual_seed(0)
    outputs = {"binary": torch.randn(2, 2, 4, 4), "fine": torch.randn(2, 16, 4, 4)}
    fine = torch.randint(0, 16, (2, 4, 4))
    fine[0, 0] = IGNORE
    targets = {"binary": torch.where(fine == IGNORE, IGNORE, (fine > 0).long()), "fine": fine}
    weights = {"binary": torch.tensor([0.5, 2.0]), "fine": torch.linspace(0.1, 3.0, 16)}
    criterion = MultitaskLoss({"binary": 0.25, "fine": 0.75}, kind, weights)
    total, per_head = criterion(outputs, targets)
    assert set(per_head) == {"binary", "fine"}
    fine_loss = dice_loss(outputs["fine"], fine, weights["fine"])
    if kind != "dice":
        fine_loss = fine_loss + focal_loss(
            outputs["fine"], fine, weights["fine"], gamma=0.0 if kind == "dice_ce" else 2.0
        )
    assert per_head["fine"].item() == pytest.approx(fine_loss.item())
    assert total.item() == pytest.approx(0.25 * per_head["binary"].item() + 0.75 * per_head["fine"].item())


# ------------------------------------------------------------------------------ class weights

COUNTS = [60, 30, 10, 0]
"""Training pixels of four classes; the last has none."""


@pytest.mark.parametrize(
    ("scheme", "expected"),
    [
        # f = 0.6, 0.3, 0.1; each raw weight divided by the mean over the three classes with pixels.
        ("none", [1.0, 1.0, 1.0, 1.0]),
        ("inverse_freq", [1 / 3, 2 / 3, 2.0, 0.0]),  # 1/f = 5/3, 10/3, 10; mean 5
        ("inverse_sqrt", [0.616814, 0.872307, 1.510879, 0.0]),  # 1/sqrt f = 1.29099, 1.82574, 3.16228
        ("inverse_sqrt_log", [0.755038, 0.946109, 1.298853, 0.0]),  # log1p of those = 0.82898, 1.03820, 1.42366
    ],
)
def test_class_weights_by_hand(scheme: str, expected: list[float]) -> None:
    assert class_weights(COUNTS, scheme, (0.1, 10.0)) == pytest.approx(expected, rel=1e-5)


def test_class_weights_are_clipped_but_a_class_without_pixels_stays_at_zero() -> None:
    assert class_weights(COUNTS, "inverse_freq", (0.5, 1.5)) == pytest.approx([0.5, 2 / 3, 1.5, 0.0])
    assert class_weights([0, 0], "inverse_sqrt", (0.1, 10.0)) == [0.0, 0.0]


def test_inverse_sqrt_log_on_the_real_frequencies_is_not_flat() -> None:
    """The seeds' x10 before the clip sent every class but Clean to the top (FACTS.md); without
    it, Burn marks weigh about 7.7x Clean and no class reaches the clip."""
    shares = [88.6, 3.3, 4.4, 0.027, 0.2, 0.0065, 0.27, 0.78, 0.08, 0.57, 0.94, 0.044, 0.11, 0.022, 0.0014, 0.65]
    weights = class_weights([round(share * 1e4) for share in shares], "inverse_sqrt_log", (0.1, 10.0))
    assert weights.index(min(weights)) == 0 and weights.index(max(weights)) == 14
    assert max(weights) / min(weights) == pytest.approx(7.7, abs=0.1)
    assert 0.1 < min(weights) and max(weights) < 10.0


# ---------------------------------------------------------------- Dice against SMP's DiceLoss


def _batch(classes: int, absent: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    logits = torch.randn(2, classes, 6, 5, generator=generator)
    kept = torch.tensor([c for c in range(classes) if c not in absent])
    target = kept[torch.randint(0, len(kept), (2, 6, 5), generator=generator)]
    target[0, :2] = IGNORE
    return logits, target


def test_dice_equals_smp_when_every_class_is_present() -> None:
    logits, target = _batch(4)
    assert (target == 3).any() and (target == 0).any()
    reference = smp.losses.DiceLoss(mode="multiclass", ignore_index=IGNORE, from_logits=True)
    assert dice_loss(logits, target).item() == pytest.approx(reference(logits, target).item(), rel=1e-6)


def test_dice_averages_over_present_classes_where_smp_averages_over_all() -> None:
    """SMP counts an absent class as a zero loss in its mean: ours = SMP's x C / present, and
    with weights, x (sum of all weights) / (sum of the present classes' weights)."""
    logits, target = _batch(5, absent=(1, 4))
    reference = smp.losses.DiceLoss(mode="multiclass", ignore_index=IGNORE, from_logits=True)
    assert dice_loss(logits, target).item() == pytest.approx(reference(logits, target).item() * 5 / 3, rel=1e-6)

    weight = torch.tensor([0.5, 1.0, 2.0, 3.0, 4.0])
    weighted = smp.losses.DiceLoss(
        mode="multiclass", ignore_index=IGNORE, from_logits=True, class_weights=weight.tolist()
    )
    present_weight = 0.5 + 2.0 + 3.0
    expected = weighted(logits, target).item() * weight.sum().item() / present_weight
    assert dice_loss(logits, target, weight).item() == pytest.approx(expected, rel=1e-6)


def test_a_class_weighted_zero_has_no_say_in_the_dice() -> None:
    logits, target = _batch(3)
    per_class = [
        smp.losses.DiceLoss(mode="multiclass", classes=[c], ignore_index=IGNORE)(logits, target).item() for c in (0, 2)
    ]
    weight = torch.tensor([1.0, 0.0, 1.0])
    assert dice_loss(logits, target, weight).item() == pytest.approx(sum(per_class) / 2, rel=1e-6)
    only_class_1 = torch.where(target == IGNORE, IGNORE, torch.ones_like(target))
    assert dice_loss(logits, only_class_1, weight).item() == 0.0


# ------------------------------------------------------------------- cross-entropy and focal


def test_cross_entropy_term_matches_pytorch_with_and_without_weights() -> None:
    logits, target = _batch(4)
    weight = torch.tensor([0.2, 1.0, 3.0, 0.7])
    for w in (None, weight):
        expected = F.cross_entropy(logits, target, weight=w, ignore_index=IGNORE)
        assert focal_loss(logits, target, w, gamma=0.0).item() == pytest.approx(expected.item(), rel=1e-6)


def test_focal_by_hand_and_unlike_smps_one_vs_rest_focal() -> None:
    logits, target = _batch(3)
    weight = torch.tensor([0.5, 1.0, 2.0])
    valid = target != IGNORE
    p = torch.softmax(logits, 1).gather(1, torch.where(valid, target, 0).unsqueeze(1)).squeeze(1)[valid]
    terms = (1 - p) ** 2 * -torch.log(p)
    alpha = weight[target[valid]]
    assert focal_loss(logits, target).item() == pytest.approx(terms.mean().item(), rel=1e-5)
    assert focal_loss(logits, target, weight).item() == pytest.approx(
        ((alpha * terms).sum() / alpha.sum()).item(), rel=1e-5
    )
    smp_focal = smp.losses.FocalLoss(mode="multiclass", ignore_index=IGNORE)(logits, target)
    assert focal_loss(logits, target).item() != pytest.approx(smp_focal.item(), rel=0.05)


@pytest.mark.parametrize("kind", ["dice_ce", "dice_focal"])
def test_ignored_pixels_do_not_count_and_an_all_ignored_head_gives_zero(kind: str) -> None:
    logits, target = _batch(4)
    criterion = MultitaskLoss({"coarse": 1.0}, kind, {"coarse": torch.tensor([1.0, 2.0, 0.5, 1.0])})
    changed = logits.clone()
    changed[0, :, :2] = torch.randn(4, 2, 5) * 40  # the ignored rows
    loss = criterion({"coarse": logits}, {"coarse": target})[0]
    assert criterion({"coarse": changed}, {"coarse": target})[0].item() == pytest.approx(loss.item(), rel=1e-6)

    free = logits.clone().requires_grad_(True)
    nothing = criterion({"coarse": free}, {"coarse": torch.full_like(target, IGNORE)})[0]
    assert nothing.item() == 0.0  # a crop of Clean and Background has no coarse labels: not NaN
    nothing.backward()
    assert torch.all(free.grad == 0)


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


def test_the_dice_loss_counts_a_class_of_millions_of_pixels_exactly() -> None:
    """12 M pixels of one class (poc58's batch of 96 at 384 px holds 14 M): each class's sums
    are exact, not one float32 addition per pixel (which summed 3.59 M here, not 4 M). Three
    classes, equally likely everywhere: Dice of the class present = 2 x 4 M / (4 M + 12 M)."""
    logits = torch.zeros(1, 3, 4000, 3000, requires_grad=True)
    target = torch.zeros(1, 4000, 3000, dtype=torch.long)
    assert dice_loss(logits, target).item() == pytest.approx(0.5, abs=1e-6)
