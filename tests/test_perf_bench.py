"""The performance benchmark runs every item end to end (tiny sizes) and writes complete JSON.

Its numbers are not checked against targets here: benchmarks are not timed tests.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

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
    "sweep": {
        "trials",
        "epochs_per_trial",
        "concurrency",
        "training_s_total",
        "ideal_wall_s",
        "wall_s",
        "overhead_ratio",
        "trials_overhead_ratio",
        "startup_s_per_trial",
    },
    "early_stopping": {
        "search_trials",
        "epochs_run",
        "epochs_at_full_length",
        "epochs_saved_fraction",
        "best_encoder_search",
        "best_encoder_fair",
        "same_best_encoder",
    },
    "prepare": {"images", "largest_megapixels", "source_mb", "seconds", "mb_per_s", "peak_rss_mb"},
}
POSITIVE = {
    "loop": ("bare_img_per_s", "in_process_img_per_s", "ray_train_img_per_s"),
    "data": ("pipeline_img_per_s", "model_img_per_s"),
    "sweep": ("training_s_total", "wall_s", "overhead_ratio"),
    "prepare": ("seconds", "peak_rss_mb", "largest_megapixels"),
}


@pytest.mark.slow
@pytest.mark.ray
def test_quick_benchmark_writes_every_field(tmp_path: Path) -> None:
    out = tmp_path / "perf"
    done = subprocess.run(
        [sys.executable, str(REPO / "sweeps" / "perf_bench.py"), "--quick", "--profile", "cpu-smoke"]
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
    assert results["sweep"]["trials"] == 2 and results["early_stopping"]["search_trials"] == 2
    assert results["early_stopping"]["epochs_run"] <= results["early_stopping"]["epochs_at_full_length"]
    assert results["prepare"]["images"] == 10
    # Every target with a measured value is checked and printed.
    assert "gpu.best_unet_convnext_mfu" not in results["targets"]
    for key in ("loop.in_process_ratio", "loop.ray_train_ratio", "data.ratio", "sweep.overhead_ratio"):
        assert isinstance(results["targets"][key]["met"], bool)
        assert key in done.stdout
    assert f"written: {report}" in done.stdout


def test_unknown_item_is_refused_before_anything_runs(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "sweeps" / "perf_bench.py"), "--items", "loop,warp", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "--items warp: unknown" in done.stderr and "Traceback" not in done.stderr
    assert not list(tmp_path.iterdir())
