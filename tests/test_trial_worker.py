"""A trial's reporter against a real MLflow store: the best epoch's figures are drawn at the
first epoch, then at most every FIGURE_INTERVAL_S, and at the last epoch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from mlflow.tracking import MlflowClient

from artefact.config import Config
from artefact.figures import Evaluation
from artefact.taxonomy import HEAD_CLASS_NAMES
from artefact.tracking import TrialRun, open_sweep
from artefact.trial_worker import EVALUATION_FOLDER, RayReporter


def _epoch(epoch: int) -> tuple[dict[str, float], Evaluation]:
    metrics = {"epoch": epoch, "val/miou_fine": 0.1 * epoch, "model/params": 1e6, "model/gflop_per_image": 1.0}
    confusion = {head: np.eye(len(names), dtype=np.int64) * epoch for head, names in HEAD_CLASS_NAMES.items()}
    return metrics, Evaluation(epoch, confusion, [])


def test_figures_are_drawn_at_the_first_and_last_epoch_not_at_every_improving_one(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = TrialRun(open_sweep(uri, "figures", {}), "trial-1", {"encoder": "tu-test_resnet"})
    sent = []
    reporter = RayReporter(run, Config().replace(train={"epochs": 4}), lambda metrics, _: sent.append(metrics["epoch"]))
    for epoch in range(1, 5):  # every epoch improves, in well under a minute
        metrics, evaluation = _epoch(epoch)
        reporter.report(metrics, None, evaluation)
    reporter.close()

    folders = [info.path for info in MlflowClient(uri).list_artifacts(run.run_id, EVALUATION_FOLDER)]
    assert folders == [f"{EVALUATION_FOLDER}/epoch_001", f"{EVALUATION_FOLDER}/epoch_004"]
    assert sent == [1, 2, 3, 4]
