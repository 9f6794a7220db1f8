"""Sweep overhead and early stopping, measured on real sweeps of the main job
(``sweeps/encoder_bench.py`` in a subprocess, as a user runs it)."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from artefact.config import Config
from artefact.config_files import read_yaml
from artefact.gpu_busy import REPORT_PREFIX
from artefact.tune.tuner import max_concurrent_trials

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "sweeps" / "encoder_bench.py"


def run_main_job(args: list[str], workdir: Path, workspace: Path) -> tuple[float, str]:
    """(wall seconds, stdout) of one sweep into ``workdir``'s results folder and MLflow store,
    on the data caches in ``workspace`` (prepared beforehand, as a user's would be)."""
    command = [
        sys.executable,
        str(BENCH),
        *args,
        "--results",
        str(workdir / "results"),
        "--workspace",
        str(workspace),
        "--tracking-uri",
        f"sqlite:///{(workdir / 'mlflow.db').resolve()}",
    ]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {done.returncode}:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
    return wall, done.stdout


def tune_results(sweep_dir: Path) -> list[list[dict]]:
    """Each trial's Tune results (one row per epoch), from the trials' ``result.json``."""
    trials = []
    for path in sorted((sweep_dir / "tune").glob("*/result.json")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if rows:
            trials.append(rows)
    return trials


def concurrency(cfg: Config, stdout: str) -> int:
    """How many trials the sweep ran at once, from the cluster size it printed."""
    found = re.search(r"Ray cluster: ([\d.]+) CPUs, ([\d.]+) GPUs", stdout)
    if found is None:
        raise RuntimeError("the sweep did not print its cluster size ('Ray cluster: …')")
    return max_concurrent_trials(cfg, {"CPU": float(found.group(1)), "GPU": float(found.group(2))})


def _search_args(profile: str, overrides: list[str], trials: int, epochs: int) -> list[str]:
    """The main job's flags for a search of ``trials`` x ``epochs`` (later --set win)."""
    sets = [flag for override in overrides for flag in ("--set", override)]
    return ["--profile", profile, *sets, "--mode", "search", "--trials", str(trials), "--epochs", str(epochs)]


def sweep_overhead(
    cfg: Config, profile: str, overrides: list[str], trials: int, epochs: int, workdir: Path, workspace: Path
) -> dict[str, object]:
    """Wall time of a sweep without early stopping against the training time measured inside its
    trials; where the rest went: before the first trial, between the trials, after the last."""
    name = "overhead"
    args = _search_args(profile, overrides, trials, epochs)
    started = time.time()  # Tune's timestamps: wall-clock time, in whole seconds
    wall, stdout = run_main_job([*args, "--name", name, "--set", "sweep.scheduler=none"], workdir, workspace)
    per_trial = tune_results(workdir / "results" / name)
    training = [sum(row["perf/epoch_s"] for row in rows) for rows in per_trial]
    startup = [rows[0]["time_total_s"] - rows[0]["perf/epoch_s"] for rows in per_trial]
    first_start = min(rows[0]["timestamp"] - rows[0]["time_total_s"] for rows in per_trial)
    last_end = max(rows[-1]["timestamp"] for rows in per_trial)
    at_once = concurrency(cfg, stdout)
    ideal = sum(training) / at_once
    return {
        "trials": len(per_trial),
        "epochs_per_trial": epochs,
        "concurrency": at_once,
        "training_s_per_trial": round(sum(training) / len(training), 2),
        "training_s_total": round(sum(training), 2),
        "ideal_wall_s": round(ideal, 2),
        "wall_s": round(wall, 2),
        "overhead_ratio": round(wall / ideal, 3),
        "trials_wall_s": round(last_end - first_start, 2),
        "trials_overhead_ratio": round((last_end - first_start) / ideal, 3),
        "before_trials_s": round(first_start - started),  # to the second, as Tune's timestamps
        "after_trials_s": round(started + wall - last_end),
        "startup_s_per_trial": round(sum(startup) / len(startup), 2),
        "startup_s_max": round(max(startup), 2),
        "gpu_busy_share": gpu_busy_shares(stdout),
    }


def gpu_busy_shares(stdout: str) -> list[float] | None:
    """Each GPU's busy share as the sweep printed it (only where it had GPUs and NVML)."""
    found = re.search(rf"{re.escape(REPORT_PREFIX)}(.*)", stdout)
    return [int(share) / 100 for share in re.findall(r"GPU \d+ (\d+)%", found.group(1))] if found else None


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


CONFIGURATION = ("encoder", "batch_size", "lr", "loss_weight_binary", "loss_weight_coarse", "loss_weight_fine")


def _configurations(rows: list[dict[str, str]]) -> list[tuple[str, ...]]:
    return sorted(tuple(row.get(key, "") for key in CONFIGURATION) for row in rows)


ASHA_GRACE_DIVISOR = 8
"""ASHA's grace period in the early-stopping item: the epochs divided by this, at least 1."""


def early_stopping_args(profile: str, overrides: list[str], trials: int, epochs: int) -> list[str]:
    """The main job's flags for both runs of the early-stopping item; the user's --set come
    after the item's grace period, so theirs wins."""
    grace = f"sweep.grace_period={max(1, epochs // ASHA_GRACE_DIVISOR)}"
    return _search_args(profile, [grace, *overrides], trials, epochs)


def early_stopping(
    cfg: Config, profile: str, overrides: list[str], trials: int, epochs: int, workdir: Path, workspace: Path
) -> dict[str, object]:
    """ASHA's search against its exhaustive referee: the same search with early stopping off.
    Both sample with the same seed, and fewer trials than TPE's random start-up (10), so they
    train the same configurations; the referee trains every one of them to full length.

    ASHA waits an eighth of the epochs before its first cut (2 of 16), as the GPU profiles
    wait a tenth to a fifth; a ``--set sweep.grace_period`` overrides that."""
    common = early_stopping_args(profile, overrides, trials, epochs)
    search_wall, _ = run_main_job([*common, "--name", "asha"], workdir, workspace)
    full_wall, _ = run_main_job([*common, "--name", "full", "--set", "sweep.scheduler=none"], workdir, workspace)
    search_dir, full_dir = workdir / "results" / "asha", workdir / "results" / "full"
    search_cfg = read_yaml(search_dir / "config.yaml")
    search_trials, full_trials = _csv_rows(search_dir / "trials.csv"), _csv_rows(full_dir / "trials.csv")
    epochs_run = sum(int(row["epochs"]) for row in search_trials)
    full = len(search_trials) * epochs

    def best_trial(rows: list[dict[str, str]]) -> dict[str, str]:
        scored = [row for row in rows if row.get(cfg.sweep.metric)]
        return max(scored, key=lambda row: float(row[cfg.sweep.metric]))

    best_search, best_full = best_trial(search_trials), best_trial(full_trials)
    return {
        "search_trials": len(search_trials),
        "epochs_per_trial": epochs,
        "grace_period": min(search_cfg["sweep"]["grace_period"], epochs),  # as the scheduler clips it
        "epochs_run": epochs_run,
        "epochs_at_full_length": full,
        "epochs_saved_fraction": round(1 - epochs_run / full, 3),
        "stopped_early": sum(row["outcome"] == "stopped_early" for row in search_trials),
        "same_configurations": _configurations(search_trials) == _configurations(full_trials),
        "best_encoder_search": best_search["encoder"],
        "best_encoder_full_length": best_full["encoder"],
        "same_best_encoder": best_search["encoder"] == best_full["encoder"],
        "same_best_trial": _configurations([best_search]) == _configurations([best_full]),
        "best_metric_search": round(float(best_search[cfg.sweep.metric]), 4),
        "best_metric_full_length": round(float(best_full[cfg.sweep.metric]), 4),
        "search_wall_s": round(search_wall, 1),
        "full_length_wall_s": round(full_wall, 1),
    }
