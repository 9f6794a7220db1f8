"""A trial's reporter against a real MLflow store: the best epoch's figures are drawn at most
every FIGURE_INTERVAL_S, at the last epoch, and before each report at which ASHA may stop
the trial; the class-weights table and the loss params are logged."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import numpy as np
import pytest
from builders import random_rows, small_config, write_folder
from mlflow.tracking import MlflowClient

from artefact.config import Config
from artefact.data.cache import PrepareParams, class_pixels
from artefact.data.prepare import prepare
from artefact.report.figures import Evaluation
from artefact.taxonomy import HEAD_CLASS_NAMES
from artefact.tracking.store import open_sweep
from artefact.tracking.trials import TrialRun
from artefact.train.compilation import compile_cache_folder
from artefact.train.reporters import CLASS_WEIGHTS_FILE, EVALUATION_FOLDER, TrialReporter, asha_rungs, trial_params
from artefact.tune.trial import TrialContext
from artefact.tune.worker import _train_and_report


def _epoch(epoch: int) -> tuple[dict[str, float], Evaluation]:
    metrics = {"epoch": epoch, "val/miou_fine": 0.1 * epoch, "model/params": 1e6, "model/gflop_per_image": 1.0}
    confusion = {head: np.eye(len(names), dtype=np.int64) * epoch for head, names in HEAD_CLASS_NAMES.items()}
    return metrics, Evaluation(epoch, confusion, [])


@pytest.mark.parametrize(
    ("sweep", "drawn_at_epochs"),
    [
        ({"mode": "search", "scheduler": "asha"}, [1, 2, 4]),  # ASHA's rungs: epochs 1, 2 (and 4)
        ({"mode": "search", "scheduler": "asha", "grace_period": 3}, [3, 4]),
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
    reporter = TrialReporter(run, cfg, lambda metrics, _: sent.append(metrics["epoch"]))
    for epoch in range(1, 5):  # every epoch improves, in well under a minute
        metrics, evaluation = _epoch(epoch)
        reporter.report(metrics, None, evaluation)
    reporter.close()

    folders = [info.path for info in MlflowClient(uri).list_artifacts(run.run_id, EVALUATION_FOLDER)]
    assert folders == [f"{EVALUATION_FOLDER}/epoch_{epoch:03d}" for epoch in drawn_at_epochs]
    assert sent == [1, 2, 3, 4]


@pytest.mark.parametrize(
    ("epochs", "grace_period", "reduction_factor"),
    [(50, 5, 3), (8, 2, 2), (9, 1, 3), (16, 2, 2), (4, 9, 2), (100, 3, 4)],
)
def test_the_figures_rungs_are_the_ones_ray_stops_trials_at(
    epochs: int, grace_period: int, reduction_factor: int
) -> None:
    from artefact.tune.tuner import asha_scheduler

    cfg = Config().replace(
        train={"epochs": epochs},
        sweep={
            "mode": "search",
            "scheduler": "asha",
            "grace_period": grace_period,
            "reduction_factor": reduction_factor,
        },
    )
    scheduler = asha_scheduler(cfg)
    milestones = {milestone for milestone, _ in scheduler._brackets[0]._rungs if milestone < epochs}
    assert asha_rungs(cfg) == milestones


def test_the_class_weights_table_and_loss_params_are_logged(tmp_path: Path) -> None:
    cache = prepare(
        write_folder(tmp_path / "src", random_rows(6)), tmp_path / "cache", PrepareParams(), log=lambda *_: None
    )
    cfg = Config().replace(
        model={"heads": ["coarse", "fine"]}, loss={"kind": "dice_ce", "class_weights": "inverse_sqrt"}
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = TrialRun(open_sweep(uri, "weights", {}), "trial-1", trial_params(cfg))
    reporter = TrialReporter(run, cfg, lambda *_: None, cache)
    reporter.report(_epoch(1)[0], None, None)
    reporter.close()

    client = MlflowClient(uri)
    params = client.get_run(run.run_id).data.params
    assert (params["loss_kind"], params["class_weights"]) == ("dice_ce", "inverse_sqrt")
    local = client.download_artifacts(run.run_id, CLASS_WEIGHTS_FILE, str(tmp_path / "down"))
    rows = list(csv.DictReader(io.StringIO(Path(local).read_text())))
    assert len(rows) == 4 + 16 and {row["head"] for row in rows} == {"coarse", "fine"}
    lightleak = next(row for row in rows if row["head"] == "fine" and row["class_name"] == "Lightleak")
    pixels = class_pixels(cache)["fine"]
    assert int(lightleak["class_id"]) == 15 and int(lightleak["train_pixels"]) == pixels[15] > 0
    assert float(lightleak["frequency"]) == pytest.approx(pixels[15] / sum(pixels))
    assert float(lightleak["weight"]) > 0
    absent = next(row for row in rows if row["head"] == "fine" and row["class_name"] == "Burn marks")
    assert (absent["train_pixels"], float(absent["weight"])) == ("0", 0.0)


def test_a_trial_points_the_compile_cache_at_its_sweeps_folder_on_the_node(
    tmp_path: Path, synthetic_cache: Path, monkeypatch
) -> None:
    """So that an encoder's later trials (in other processes, after restarts) load its compiled
    code instead of compiling again (the benchmark's compile item measures the difference)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor's default"))
    cfg = small_config(train={"epochs": 1, "steps_per_epoch": 1})
    reporter = TrialReporter(None, cfg, lambda metrics, checkpoint: None)
    _train_and_report(cfg, TrialContext(synthetic_cache, tmp_path, name="sweep-a"), reporter, None)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(compile_cache_folder("sweep-a"))
    assert compile_cache_folder("sweep-a").parent.name.startswith("artefact-compiled-")
