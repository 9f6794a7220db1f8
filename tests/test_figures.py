"""The PNG figures: each exists, decodes, has the size it was drawn at, and is not blank."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import optuna
import pytest
from image_checks import assert_drawn

from artefact.report import figures
from artefact.report.figures import Evaluation, Prediction
from artefact.report.leaderboard import write_plots
from artefact.report.trials import TrialSummary
from artefact.taxonomy import FINE_NAMES, HEAD_CLASS_NAMES, IGNORE_INDEX, palette


def _prediction(seed: int) -> Prediction:
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 16, (48, 64), dtype=np.uint8)
    truth[:, 56:] = IGNORE_INDEX
    image = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    return Prediction(f"../odd id/{seed}", image, truth, np.full_like(truth, 10))


def test_evaluation_figures_one_confusion_per_head_and_one_overlay_per_image(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    confusion = {head: rng.integers(0, 500, (len(names), len(names))) for head, names in HEAD_CLASS_NAMES.items()}
    evaluation = Evaluation(3, confusion, [_prediction(1), _prediction(2)])
    paths = figures.evaluation_figures(evaluation, tmp_path)
    names = [p.name for p in paths]
    assert names == [
        "confusion_binary.png",
        "confusion_coarse.png",
        "confusion_fine.png",
        "prediction_1_odd_id_1.png",  # hostile-looking ids become plain file names
        "prediction_2_odd_id_2.png",
    ]
    assert all(p.parent == tmp_path for p in paths)
    for path in paths[:3]:
        assert_drawn(path, figures.CONFUSION_SIZE)
    overlay = assert_drawn(paths[3], figures.PREDICTION_SIZE)
    # The prediction panel is drawn in the official colour of the predicted class (Staining).
    staining = palette()[10]
    assert np.all(overlay == staining, axis=-1).sum() > 500


def test_a_confusion_matrix_with_an_empty_row_still_draws(tmp_path: Path) -> None:
    counts = np.zeros((16, 16), dtype=np.int64)
    counts[0, 0] = 10
    assert_drawn(
        figures.confusion_figure(counts, HEAD_CLASS_NAMES["fine"], "t", tmp_path / "c.png"), figures.CONFUSION_SIZE
    )


def _summary(trial_id: str, encoder: str, score: float, speed: float) -> TrialSummary:
    best = {"val/miou_fine": score, "perf/img_per_s": speed}
    best.update({f"val/iou/{name}": score * (i + 1) / 16 for i, name in enumerate(FINE_NAMES) if i % 3})
    return TrialSummary(trial_id, {"encoder": encoder}, "completed", 3, best=best)


@pytest.mark.parametrize("mode", ["search", "fair"])
def test_sweep_plots(tmp_path: Path, mode: str) -> None:
    summaries = [
        _summary("a", "tu-test_convnext", 0.3, 20.0),
        _summary("b", "tu-test_convnext", 0.2, 25.0),
        _summary("c", "tu-test_resnet", 0.1, 40.0),
        TrialSummary("d", {"encoder": "tu-test_vit"}, "failed", 0, "boom"),
    ]
    histories = {t: [{"epoch": e, "val/miou_fine": 0.05 * e} for e in (1, 2, 3)] for t in "abc"}
    rows = [{"encoder": "tu-test_convnext"}, {"encoder": "tu-test_resnet"}]
    paths = write_plots(rows, summaries, histories, "val/miou_fine", mode, tmp_path)
    assert [p.name for p in paths] == ["speed_quality.png", "iou_per_class.png", "validation_curves.png"]
    for path, size in zip(paths, (figures.SCATTER_SIZE, figures.HEATMAP_SIZE, figures.CURVES_SIZE), strict=True):
        assert_drawn(path, size)


def test_optuna_figures_and_what_is_skipped_when_too_few_trials(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    study.optimize(lambda t: t.suggest_float("lr", 1e-4, 1e-2) * t.suggest_int("batch", 1, 8), n_trials=6)
    paths, skipped = figures.optuna_figures(storage, "s", tmp_path / "plots")
    assert [p.name for p in paths] == ["optuna_history.png", "optuna_importances.png"] and not skipped
    for path in paths:
        assert_drawn(path, figures.CURVES_SIZE)
    assert matplotlib.rcParams["axes.facecolor"] == "white", "Optuna's plot style leaked into later figures"

    optuna.create_study(study_name="empty", storage=storage, direction="maximize")
    paths, skipped = figures.optuna_figures(storage, "empty", tmp_path / "empty")
    assert paths == [] and "0 finished trial(s)" in skipped[0]
