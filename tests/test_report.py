"""The leaderboard states cost next to quality, as the seeds' tables did, and which batch and
learning rate each encoder trained at."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from artefact.config import ModelConfig
from artefact.config_files import PROFILES, load_config
from artefact.errors import TrainingDiverged, UserError
from artefact.gpu_memory import check_fits, estimate_training_gb
from artefact.report.leaderboard import leaderboard, render_text, write_leaderboard
from artefact.report.trials import TrialSummary
from artefact.tune.results import _root_cause, _training_time
from artefact.tune.space import apply_trial_params


def _trial(trial_id: str, encoder: str, score: float, train_s: float, outcome: str = "completed") -> TrialSummary:
    best = {
        "val/miou_fine": score,
        "perf/img_per_s": 100.0,
        "perf/peak_mem_mb": 2048.0,
        "model/params": 3e7,
        "perf/train_s": train_s,
        "perf/to_best_s": train_s / 2,
        "perf/gpu_hours": train_s / 3600,  # one GPU
    }
    params = {"encoder": encoder, "batch_size": 32 if encoder == "mit_b3" else 96, "lr": 1e-3}
    return TrialSummary(trial_id, params, outcome, 50, None if outcome != "failed" else "boom", best)


def test_fair_rows_state_minutes_per_trial_to_the_best_epoch_and_the_encoders_gpu_hours(tmp_path: Path) -> None:
    summaries = [
        _trial("a", "convnext_tiny", 0.25, 1800),
        _trial("b", "convnext_tiny", 0.27, 2400),
        _trial("c", "mit_b3", 0.37, 3600),
        _trial("d", "mit_b3", 0.0, 600, outcome="failed"),  # paid for, never ranked
    ]
    rows = leaderboard(summaries, "fair", uses_gpus=True)
    assert [row["encoder"] for row in rows] == ["mit_b3", "convnext_tiny"]
    mit, convnext = rows
    assert mit["trials"] == 1 and mit["gpu_h"] == pytest.approx((3600 + 600) / 3600)
    assert convnext["train_min"] == pytest.approx((35.0, 7.0710678), rel=1e-6)  # mean ± std of 30 and 40
    assert convnext["to_best_min"][0] == pytest.approx(17.5)
    assert convnext["gpu_h"] == pytest.approx(4200 / 3600)
    assert (mit["batch"], mit["lr"], convnext["batch"]) == (32, 1e-3, 96)

    text = render_text(rows, "fair")
    assert "35.00 ± 7.07" in text and "1.17" in text and "gpu_h" in text.splitlines()[0]
    board = list(csv.DictReader(write_leaderboard(rows, summaries, "fair", tmp_path)[0].open()))
    assert board[0]["encoder"] == "mit_b3" and float(board[0]["gpu_h"]) == pytest.approx(4200 / 3600 * 1)
    assert float(board[1]["train_min_std"]) == pytest.approx(7.0710678)


def test_cpu_trials_have_no_gpu_hours() -> None:
    (row,) = leaderboard([_trial("a", "tu-test_convnext", 0.1, 60)], "search", uses_gpus=False)
    assert row["gpu_h"] is None and row["train_min"] == (1.0, 0.0)
    assert render_text([row], "search").splitlines()[2].rstrip().endswith("-")


def test_training_time_adds_the_epochs_up_to_the_best_one() -> None:
    rows = [{"epoch": 1, "perf/epoch_s": 10.0}, {"epoch": 2, "perf/epoch_s": 12.0}, {"epoch": 3, "perf/epoch_s": 11.0}]
    assert _training_time(rows, best_epoch=2) == {"perf/train_s": 33.0, "perf/to_best_s": 22.0}


def test_a_trial_of_an_encoder_with_a_smaller_batch_trains_at_it_and_the_memory_check_uses_it() -> None:
    poc55 = ["model.arch=upernet", "resources.gpus_per_worker=1", "resources.gpu_memory_gb=6", "data.resolution=384"]
    capped = load_config(
        None, [*poc55, "sweep.mode=fair", "sweep.encoders=[maxvit_tiny]", "sweep.encoder_max_batch={maxvit_tiny: 4}"]
    )
    trial = apply_trial_params(capped, {"encoder": "maxvit_tiny", "seed": 0})
    assert (trial.train.batch_size, trial.train.lr) == (4, pytest.approx(capped.train.lr / 2))
    check_fits(capped)  # about 3.8 GB at batch 4
    uncapped = load_config(None, [*poc55, "sweep.mode=fair", "sweep.encoders=[maxvit_tiny]"])
    with pytest.raises(UserError, match=r"batch size 8 with maxvit_tiny .* sweep\.encoder_max_batch\.maxvit_tiny"):
        check_fits(uncapped)


def test_the_laptop_batches_are_the_largest_that_leave_its_margin_free() -> None:
    """Each encoder's largest batch fits 6 GB less the profile's 20% margin, and four more
    images would not: the smoke sweep neither runs out of memory nor wastes the GPU."""
    laptop = load_config(PROFILES / "laptop.yaml")
    res = laptop.resources
    assert (res.gpu_memory_gb, res.gpu_memory_margin, laptop.data.resolution) == (6, 0.2, 384)
    budget = res.gpu_memory_gb * (1 - res.gpu_memory_margin)
    check_fits(laptop)
    for encoder in laptop.sweep.encoders:
        batch, _ = laptop.sweep.scaled_batch(encoder, max(laptop.sweep.batch_sizes), laptop.train.lr)
        model = ModelConfig(laptop.model.arch, encoder, laptop.model.heads, False)
        assert (
            estimate_training_gb(model, 384, batch, amp=True)
            <= budget
            < estimate_training_gb(model, 384, batch + 4, amp=True)
        ), encoder
    with pytest.raises(UserError, match=r"needs about 5\.\d GB, but each trial gets 4\.8 GB .* less a margin of 20%"):
        check_fits(laptop.replace(sweep={"batch_sizes": [16]}))


def test_a_ray_train_trial_fails_with_its_worker_reason_not_trains_wrapper() -> None:
    """The leaderboard's failure line under Ray Train: rank 0's own exception, as in process."""
    from ray.exceptions import RayTaskError
    from ray.train import WorkerGroupError

    diverged = TrainingDiverged("the training loss became NaN or infinite at epoch 2, by step 9")
    on_worker = RayTaskError("train_fn", "traceback", diverged)
    error = WorkerGroupError("[Rank 0 Error Snippet]: ...", {1: ValueError("rank 1 saw rank 0 go"), 0: on_worker})
    assert _root_cause(error) == "TrainingDiverged: the training loss became NaN or infinite at epoch 2, by step 9"


def test_auto_packing_fits_the_trials_a_gpu_can_hold_and_the_node_can_feed() -> None:
    """On the V100S node, auto chooses what the profile chose by hand (two trials per 32 GB
    GPU: CoAtNet-0 at batch 32 needs about 15.5 GB); the laptop's 6 GB GPU holds one; small
    models are held back by the node's CPUs, then by the cap of four."""
    said = []
    v100s = load_config(PROFILES / "v100s-x2.yaml", ["resources.gpus_per_worker=auto"], log=said.append)
    assert v100s.resources.gpus_per_worker == 0.5 == load_config(PROFILES / "v100s-x2.yaml").resources.gpus_per_worker
    assert said and "2 trial(s) per GPU; coatnet_0 at batch 32" in said[0]
    check_fits(v100s)
    laptop = load_config(PROFILES / "laptop.yaml", ["resources.gpus_per_worker=auto"])
    assert laptop.resources.gpus_per_worker == 1.0
    tiny = ["resources.gpus_per_worker=auto", "sweep.encoders=[tu-test_convnext]"]
    assert load_config(PROFILES / "v100s-x2.yaml", tiny).resources.gpus_per_worker == 0.5  # 16 CPUs / 2 GPUs / 3
    many_cpus = [*tiny, "resources.node_cpus=64"]
    assert load_config(PROFILES / "v100s-x2.yaml", many_cpus).resources.gpus_per_worker == 0.25  # at most 4
    thirds = [*many_cpus, "resources.gpu_memory_gb=12"]  # 3.6 GB each: room for 3
    assert load_config(PROFILES / "v100s-x2.yaml", thirds).resources.gpus_per_worker == 0.3333


def test_auto_packing_without_the_gpus_memory_is_refused_naming_the_fields(bad_input_tried) -> None:
    with pytest.raises(UserError, match=r"gpus_per_worker = auto .* resources\.gpu_memory_gb .* resources\.node_gpus"):
        load_config(None, ["resources.gpus_per_worker=auto", "resources.node_gpus=1"])
    bad_input_tried("resources.gpus_per_worker=auto without resources.gpu_memory_gb")
