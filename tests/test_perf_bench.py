"""The performance benchmark runs every item end to end (tiny sizes) and writes complete JSON.

Its numbers are not checked against targets here: benchmarks are not timed tests.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from builders import small_config
from sweep_helpers import import_script, ray_cluster_processes

from artefact.config_files import parse_overrides
from bench import throughput
from bench.sweeps import early_stopping_args

REPO = Path(__file__).resolve().parents[1]

FIELDS = {
    "loop": {
        "encoder",
        "batch_size",
        "resolution",
        "amp",
        "steps",
        "bare_img_per_s",
        "in_process_img_per_s",
        "in_process_ratio",
        "ray_train_img_per_s",
        "ray_train_ratio",
    },
    "data": {"profile_workers", "pipeline_img_per_s", "model_img_per_s", "ratio", "workers_for_2x", "scan_img_per_s"},
    "trial": {
        "profile",
        "encoder",
        "batch_size",
        "steps_per_epoch",
        "epochs",
        "train_images",
        "val_images",
        "wall_s",
        "bare_s",
        "wall_over_bare",
        "overhead_share",
        "setup_s",
        "epoch_s",
        "per_epoch_s",
        "checkpoint_mb",
        "checkpoint_copy",
        "checkpoint_write_and_copy_s",
    },
    "sweep": {
        "trials",
        "epochs_per_trial",
        "concurrency",
        "training_s_total",
        "ideal_wall_s",
        "wall_s",
        "overhead_ratio",
        "trials_overhead_ratio",
        "before_trials_s",
        "after_trials_s",
        "startup_s_per_trial",
        "gpu_busy_share",
    },
    "early_stopping": {
        "search_trials",
        "grace_period",
        "epochs_run",
        "epochs_at_full_length",
        "epochs_saved_fraction",
        "same_configurations",
        "best_encoder_search",
        "best_encoder_full_length",
        "same_best_encoder",
        "same_best_trial",
    },
    "prepare": {"images", "largest_megapixels", "source_mb", "seconds", "mb_per_s", "peak_rss_mb"},
}
POSITIVE = {
    "loop": ("bare_img_per_s", "in_process_img_per_s", "ray_train_img_per_s"),
    "data": ("pipeline_img_per_s", "model_img_per_s"),
    "trial": ("wall_s", "bare_s", "wall_over_bare", "steps_per_epoch", "checkpoint_mb"),
    "sweep": ("training_s_total", "wall_s", "overhead_ratio", "before_trials_s", "after_trials_s"),
    "prepare": ("seconds", "peak_rss_mb", "largest_megapixels"),
}


@pytest.mark.slow
@pytest.mark.ray
def test_quick_benchmark_writes_every_field(tmp_path: Path) -> None:
    out = tmp_path / "perf"
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "perf_bench.py"), "--quick", "--profile", "cpu-smoke"]
        + ["--items", ",".join(FIELDS) + ",gpu"]  # the compile item has its own test
        + ["--out", str(out), "--workdir", str(tmp_path / "work")],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [report] = list(out.glob("cpu-smoke-cpu-*.json"))
    results = json.loads(report.read_text())

    assert results["profile"] == "cpu-smoke" and results["quick"] is True
    for item, fields in FIELDS.items():
        missing = fields - set(results[item])
        assert not missing, f"{item} lacks {missing}"
        for field in POSITIVE.get(item, ()):
            value = results[item][field]
            assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (item, field, value)
    assert results["gpu"] == {"skipped": "no CUDA GPU is visible", "bench_s": results["gpu"]["bench_s"]}
    # Each loop row is printed when measured, so a run cut short still shows what it measured.
    for row, speeds in results["loop"]["runs_img_per_s"].items():
        printed = re.search(rf"repeat 1/1 {row}: ([\d.]+) img/s", done.stdout)
        assert printed and float(printed.group(1)) == pytest.approx(speeds[0], abs=0.06), row
    assert results["sweep"]["trials"] == 2 and results["early_stopping"]["search_trials"] == 2
    assert results["sweep"]["gpu_busy_share"] is None  # a CPU sweep samples no GPU
    assert results["early_stopping"]["epochs_run"] <= results["early_stopping"]["epochs_at_full_length"]
    assert results["early_stopping"]["grace_period"] == 1  # an eighth of 2 epochs, at least 1
    # The referee trains the very configurations the search sampled (same seed), to full length.
    assert results["early_stopping"]["same_configurations"] is True
    assert results["prepare"]["images"] == 10
    # The trial item: the v100s-x2 epoch shape (its batch), every phase of the difference named.
    trial = results["trial"]
    assert trial["profile"] == "v100s-x2" and trial["batch_size"] == 32 and trial["epochs"] == 2
    assert len(trial["epoch_s"]) == 2 and trial["wall_s"] >= sum(trial["epoch_s"])
    # The bare work is timed beside each epoch, and its time is not the trial's.
    assert len(trial["bare_epoch_s"]) == 2 and trial["bare_s"] == pytest.approx(sum(trial["bare_epoch_s"]), abs=0.05)
    assert set(trial["per_epoch_s"]) == {
        "steps_bare",
        "steps_extra",
        "loader_wait",
        "validation_bare",
        "validation_extra",
        "checkpoint",
        "mlflow",
        "figures",
        "send",
        "report_other",
    }
    assert trial["per_epoch_s"]["figures"] > 0  # drawn at the last epoch
    # v100s-x2 trains under Ray Train, which copies checkpoints in the background, as the item does.
    assert trial["checkpoint_copy"] == "background" and trial["checkpoint_write_and_copy_s"] > 0
    assert trial["checkpoint_mb"] > 0
    # Every target with a measured value is checked and printed.
    assert "gpu.best_unet_convnext_mfu" not in results["targets"]
    for key in (
        "loop.in_process_ratio",
        "loop.ray_train_ratio",
        "data.ratio",
        "trial.overhead_share",
        "sweep.overhead_ratio",
    ):
        assert isinstance(results["targets"][key]["met"], bool)
        assert key in done.stdout
    assert f"written: {report}" in done.stdout


def _grace_period(args: list[str]) -> int:
    """The grace period the main job takes from these flags (its --set, the last one winning)."""
    return parse_overrides([args[i + 1] for i, flag in enumerate(args) if flag == "--set"])["sweep"]["grace_period"]


def test_the_early_stopping_item_waits_an_eighth_of_the_epochs_unless_told_otherwise() -> None:
    assert _grace_period(early_stopping_args("cpu-smoke", [], 8, 16)) == 2
    assert _grace_period(early_stopping_args("cpu-smoke", [], 8, 5)) == 1
    told = early_stopping_args("cpu-smoke", ["sweep.grace_period=3", "train.lr=0.001"], 8, 16)
    assert _grace_period(told) == 3
    assert told[-4:] == ["--trials", "8", "--epochs", "16"]


def test_each_loop_row_is_printed_as_soon_as_it_is_measured(monkeypatch, capsys) -> None:
    """A run cut short (a lent GPU's time limit) must still have shown the rows it measured."""
    bench = import_script("perf_bench", folder="bench")
    printed_before_ray = []

    def ray_train_speed(cfg, cache, steps, cpus) -> float:
        printed_before_ray.append(capsys.readouterr().out)
        if len(printed_before_ray) == 2:
            raise throughput.RayTrainFailed("stalled")
        return 8.0

    monkeypatch.setattr(bench, "bare_speed", lambda cfg, sizes: 10.0)
    monkeypatch.setattr(throughput, "loop_speed", lambda cfg, cache, steps: 9.0)
    monkeypatch.setattr(throughput, "ray_train_speed", ray_train_speed)
    result = bench.measure_loop(small_config(), Path("unused"), bench.Sizes(loop_repeats=3))

    assert "repeat 1/3 bare: 10.0 img/s" in printed_before_ray[0]
    assert "repeat 1/3 in_process: 9.0 img/s" in printed_before_ray[0]
    assert "repeat 1/3 ray_train: 8.0 img/s" in printed_before_ray[1]
    # A failed Ray Train row is not tried again; the other rows go on.
    assert result["runs_img_per_s"] == {"bare": [10.0] * 3, "in_process": [9.0] * 3, "ray_train": [8.0]}
    assert result["ray_train_skipped"] == "stalled" and result["in_process_ratio"] == 0.9


def test_unknown_item_is_refused_before_anything_runs(tmp_path: Path, bad_input_tried) -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "perf_bench.py"), "--items", "loop,warp", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "--items warp: unknown" in done.stderr and "Traceback" not in done.stderr
    assert not list(tmp_path.iterdir())
    bad_input_tried("benchmark flag")


@pytest.mark.parametrize(
    "flag", ["--loop-steps", "--loop-repeats", "--sweep-trials", "--sweep-epochs", "--asha-epochs"]
)
@pytest.mark.parametrize("value", ["0", "-3", "many"])
def test_a_size_below_one_is_refused_before_anything_runs(
    tmp_path: Path, flag: str, value: str, bad_input_tried
) -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "perf_bench.py"), flag, value, "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert f"argument {flag}: {value!r} is not a whole number of 1 or more" in done.stderr
    assert "Traceback" not in done.stderr and not list(tmp_path.iterdir())
    bad_input_tried("benchmark flag")


STALLED_RAY_TRAIN = """
import sys
import time
from pathlib import Path
from artefact.tune.ray_env import prepare_local_cluster

prepare_local_cluster(Path(sys.argv[2]))
from bench.throughput import RayTrainFailed, ray_train_speed
from artefact.config import Config

cfg = Config().replace(data={"resolution": 64}, model={"encoder": "tu-test_convnext"})
try:
    ray_train_speed(cfg, Path(sys.argv[1]), steps=int(sys.argv[3]), cpus=2, patience_s=float(sys.argv[4]))
except RayTrainFailed as failure:
    time.sleep(5)  # the benchmark goes on to its next item: it must live through it
    print(failure)
    sys.exit(3)
"""


@pytest.mark.slow
@pytest.mark.ray
def test_a_ray_train_row_that_does_not_finish_is_reported_with_rays_logs(tmp_path: Path, synthetic_cache: Path) -> None:
    """On a lent H100 the Ray Train row never finished; the benchmark must say so and show why."""
    done = subprocess.run(
        [sys.executable, "-c", STALLED_RAY_TRAIN, str(synthetic_cache), str(tmp_path / "token"), "2", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert done.returncode == 3, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Ray Train did not finish (no result after 1 s of training). The end of Ray's logs:" in done.stdout
    assert "--- raylet.out" in done.stdout
    # Nothing of the stalled row lives on.
    assert not _left_running(tmp_path / "token")


@pytest.mark.slow
@pytest.mark.ray
def test_a_benchmark_killed_mid_row_leaves_no_ray_process_behind(tmp_path: Path, synthetic_cache: Path) -> None:
    """The row's driver leaves the benchmark's process group, so a CI timeout that kills the
    benchmark does not reach it: it must die with the benchmark, and Ray with it."""
    token = tmp_path / "token"
    benchmark = subprocess.Popen(
        [sys.executable, "-c", STALLED_RAY_TRAIN, str(synthetic_cache), str(token), "100000", "600"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=REPO,
    )
    try:
        deadline = time.monotonic() + 180
        while not any("raylet" in command for command in ray_cluster_processes(token).values()):
            assert benchmark.poll() is None and time.monotonic() < deadline, "Ray never started"
            time.sleep(0.5)
    finally:
        benchmark.kill()
        benchmark.wait()
    left_running = _left_running(token)
    for pid in left_running:  # not to disturb the tests after this one
        os.kill(pid, signal.SIGKILL)
    assert not left_running


def _left_running(token: Path, patience_s: float = 20) -> dict[int, str]:
    """The Ray processes still running once they have had ``patience_s`` to exit."""
    deadline = time.monotonic() + patience_s
    while (found := ray_cluster_processes(token)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return found


@pytest.mark.slow
@pytest.mark.compiler
def test_a_second_run_of_an_encoder_finds_the_compile_cache_warm(tmp_path: Path, synthetic_cache: Path) -> None:
    """The compile item, tiny: eager, then compiled in a fresh process with an empty cache,
    then again in another fresh process, which loads every graph instead of compiling it."""
    from bench.compiling import measure_compile

    cfg = small_config(model={"heads": ["fine"]}, train={"epochs": 2, "steps_per_epoch": 2})
    result = measure_compile(cfg, synthetic_cache, tmp_path)
    eager, cold, warm = (result["runs"][name] for name in ("eager", "cold", "warm"))
    assert (eager["compiled"], cold["compiled"], warm["compiled"]) == (False, True, True)
    assert cold["fx_graph_cache_misses"] > 0 and cold["fx_graph_cache_hits"] == 0
    assert warm["fx_graph_cache_hits"] == cold["fx_graph_cache_misses"] and warm["fx_graph_cache_misses"] == 0
    assert warm["first_epoch_extra_s"] < cold["first_epoch_extra_s"] and result["cache_mb"] > 0
    assert result["warm_compile_s"] < result["cold_compile_s"]
    for field in ("step_gain", "cold_compile_s", "warm_compile_s", "auto_break_even_images"):
        assert field in result
