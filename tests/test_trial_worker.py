"""A trial's reporter against a real MLflow store: the best epoch's figures are drawn at most
every FIGURE_INTERVAL_S and at the last epoch, and at the first epoch where ASHA may stop
the trial."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
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


@pytest.mark.parametrize(
    ("sweep", "drawn_at_epochs"),
    [
        ({"mode": "search", "scheduler": "asha"}, [1, 4]),  # ASHA may stop it after epoch 1
        ({"mode": "search", "scheduler": "none"}, [4]),
        ({"mode": "fair", "scheduler": "asha"}, [4]),  # fair sweeps never stop a trial early
    ],
)
def test_figures_are_drawn_at_the_last_epoch_not_at_every_improving_one(
    tmp_path: Path, sweep: dict[str, str], drawn_at_epochs: list[int]
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = TrialRun(open_sweep(uri, "figures", {}), "trial-1", {"encoder": "tu-test_resnet"})
    sent = []
    cfg = Config().replace(train={"epochs": 4}, sweep=sweep)
    reporter = RayReporter(run, cfg, lambda metrics, _: sent.append(metrics["epoch"]))
    for epoch in range(1, 5):  # every epoch improves, in well under a minute
        metrics, evaluation = _epoch(epoch)
        reporter.report(metrics, None, evaluation)
    reporter.close()

    folders = [info.path for info in MlflowClient(uri).list_artifacts(run.run_id, EVALUATION_FOLDER)]
    assert folders == [f"{EVALUATION_FOLDER}/epoch_{epoch:03d}" for epoch in drawn_at_epochs]
    assert sent == [1, 2, 3, 4]
