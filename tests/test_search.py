"""The sweep's Optuna study after a resume: no trial is left RUNNING once the sweep ends."""

from __future__ import annotations

from pathlib import Path

import optuna

from artefact.search import fail_orphaned_study_trials, optuna_storage


def test_a_suggestion_the_killed_sweep_never_recorded_ends_failed_and_the_others_keep_their_state(
    tmp_path: Path,
) -> None:
    study = optuna.create_study(study_name="killed", storage=optuna_storage(tmp_path), direction="maximize")
    finished = study.ask({"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)})
    study.tell(finished, 0.3)
    study.ask()  # asked for by the sweep, which was killed before Tune saved that trial

    fail_orphaned_study_trials(tmp_path, "killed")
    states = [t.state for t in optuna.load_study(study_name="killed", storage=optuna_storage(tmp_path)).trials]
    assert states == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL]
    assert optuna.load_study(study_name="killed", storage=optuna_storage(tmp_path)).best_value == 0.3
