"""Accuracy against cost: a multi-objective search (``--objectives``) through Optuna's
multi-objective sampler, and the Pareto front of its trials."""

from __future__ import annotations

import csv
from pathlib import Path

import optuna
import pytest
from sweep_helpers import run_bench

from artefact.config_files import SweepFlags, load_config
from artefact.errors import UserError
from artefact.report.pareto import describe_front, front_rows, pareto_front
from artefact.report.trials import TrialSummary


def test_the_front_keeps_what_nothing_beats_on_every_objective() -> None:
    points = [(0.30, 100.0), (0.25, 150.0), (0.20, 90.0), (0.30, 100.0), (0.10, 200.0), (0.29, 100.0)]
    assert pareto_front(points, ("max", "max")) == [True, True, False, True, True, False]  # equal points both stay
    memory = [(0.30, 4000.0), (0.28, 2000.0), (0.28, 2500.0)]
    assert pareto_front(memory, ("max", "min")) == [True, True, False]


def test_rows_put_the_front_first_and_skip_failed_or_unscored_trials() -> None:
    def trial(trial_id: str, miou: float, speed: float, outcome: str = "completed") -> TrialSummary:
        best = {"val/miou_fine": miou, "perf/img_per_s": speed}
        return TrialSummary(trial_id, {"encoder": f"enc-{trial_id}"}, outcome, 3, best=best)

    summaries = [trial("slow", 0.3, 50), trial("fast", 0.2, 200), trial("worse", 0.1, 40)]
    summaries.append(trial("failed", 0.9, 900, "failed"))
    summaries.append(TrialSummary("unscored", {"encoder": "e"}, "stopped_early", 0))
    rows = front_rows(summaries, ("miou_fine", "img_per_s"))
    assert [(row["trial_id"], row["front"]) for row in rows] == [("slow", True), ("fast", True), ("worse", False)]
    assert describe_front(rows, ("miou_fine", "img_per_s")) == [
        "Pareto front (miou_fine ↑, img_per_s ↑): 2 of 3 scored trials",
        "  slow  enc-slow: miou_fine 0.3, img_per_s 50",
        "  fast  enc-fast: miou_fine 0.2, img_per_s 200",
    ]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["sweep.objectives=[miou_fine, img_per_s]"], "ASHA stops trials on one metric"),
        (["sweep.objectives=[miou_fine]", "sweep.scheduler=none"], "two or more distinct names"),
        (["sweep.objectives=[miou_fine, speed]", "sweep.scheduler=none"], "two or more distinct names"),
        (["sweep.objectives=[miou_fine, img_per_s]", "sweep.scheduler=none", "sweep.mode=fair"], "fair mode"),
    ],
    ids=["with-asha", "one-objective", "unknown-objective", "fair-mode"],
)
def test_objectives_that_cannot_be_searched_are_refused_in_one_line(overrides, expected, bad_input_tried) -> None:
    with pytest.raises(UserError, match=rf"config field sweep\.objectives = .*{expected}"):
        load_config(None, overrides)
    bad_input_tried("sweep.objectives")


def test_the_flag_sets_the_objectives_and_turns_asha_off() -> None:
    cfg = load_config(None, flags=SweepFlags(objectives="miou_fine, peak_mem_mb"))
    assert cfg.sweep.objectives == ("miou_fine", "peak_mem_mb") and cfg.sweep.scheduler == "none"


@pytest.mark.slow
@pytest.mark.ray
def test_a_two_objective_search_runs_optuna_on_both_and_reports_the_front(
    tmp_path: Path, synthetic_workspace: Path
) -> None:
    results = tmp_path / "results"
    done = run_bench(
        results,
        synthetic_workspace,
        tmp_path / "mlflow.db",
        *("--name", "pareto", "--objectives", "miou_fine,img_per_s", "--trials", "3", "--epochs", "1"),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    study = optuna.load_study(study_name="pareto", storage=f"sqlite:///{results / 'pareto' / 'optuna.db'}")
    assert study.directions == [optuna.study.StudyDirection.MAXIMIZE] * 2
    finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(finished) == 3 and all(len(t.values) == 2 for t in finished)
    rows = list(csv.DictReader((results / "pareto" / "pareto.csv").open()))
    assert len(rows) == 3 and any(row["front"] == "True" for row in rows)
    front = [row for row in rows if row["front"] == "True"]
    assert f"Pareto front (miou_fine ↑, img_per_s ↑): {len(front)} of 3 scored trials" in done.stdout
    assert all(f"  {row['trial_id']}  {row['encoder']}: miou_fine" in done.stdout for row in front)
    board = (results / "pareto" / "leaderboard.md").read_text()
    assert f"## Pareto front (miou_fine ↑, img_per_s ↑): {len(front)} of 3 scored trials" in board
    assert all(f"- {row['trial_id']}  {row['encoder']}: miou_fine" in board for row in front)
