"""The sweep's Optuna study: its space (searched loss kinds and class weightings reach the
trial's config) and, after a resume, no trial left RUNNING once the sweep ends."""

from __future__ import annotations

import pickle
from pathlib import Path

import optuna
import pytest

from artefact.config import Config
from artefact.report.leaderboard import describe_config
from artefact.tune.progress import ProgressLog
from artefact.tune.space import SearchSpace, apply_trial_params, default_points, space_description
from artefact.tune.tuner import ResumableOptunaSearch, fail_orphaned_study_trials, optuna_storage


def test_searched_loss_kinds_and_class_weightings_are_sampled_into_the_trial_config() -> None:
    cfg = Config().replace(
        loss={"kind": "dice_ce", "class_weights": "inverse_sqrt_log"},
        sweep={"search_class_weights": ["none", "inverse_sqrt_log"], "search_loss_kinds": ["dice_focal", "dice"]},
    )
    space = SearchSpace.from_config(cfg)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    sampled = set()
    for _ in range(16):
        trial = study.ask()
        space(trial)
        trial_cfg = apply_trial_params(cfg, trial.params)
        assert (trial_cfg.loss.kind, trial_cfg.loss.class_weights) == (
            trial.params["loss_kind"],
            trial.params["class_weights"],
        )
        sampled.add((trial_cfg.loss.kind, trial_cfg.loss.class_weights))
        study.tell(trial, 0.0)
    assert sampled == {(k, w) for k in ("dice_focal", "dice") for w in ("none", "inverse_sqrt_log")}

    # The default points take the base config's values, or the first choice where it is not one.
    points = default_points(cfg)
    assert [(p["loss_kind"], p["class_weights"]) for p in points] == [("dice_focal", "inverse_sqrt_log")] * 2
    assert space_description(cfg)["class_weights"] == ["none", "inverse_sqrt_log"]
    assert "class_weights=none" in describe_config({"encoder": "tu-test_resnet", "class_weights": "none"})

    # Not searched: no such trial param, and every trial keeps the loss.* values.
    fixed = cfg.replace(sweep={"search_class_weights": [], "search_loss_kinds": []})
    trial = study.ask()
    SearchSpace.from_config(fixed)(trial)
    assert not {"loss_kind", "class_weights"} & set(trial.params)
    loss = apply_trial_params(fixed, trial.params).loss
    assert (loss.kind, loss.class_weights) == ("dice_ce", "inverse_sqrt_log")
    assert space_description(fixed)["class_weights"] == ["inverse_sqrt_log"]


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


@pytest.mark.parametrize("name", ["ResumableOptunaSearch", "SearchSpace", "ProgressLog"])
def test_a_sweep_saved_before_the_package_layout_finds_its_pickled_classes(name: str) -> None:
    """Tune's saved state names these classes by their old module; --resume must still load them."""
    current = {"ResumableOptunaSearch": ResumableOptunaSearch, "SearchSpace": SearchSpace, "ProgressLog": ProgressLog}
    assert pickle.loads(f"cartefact.search\n{name}\n.".encode()) is current[name]
