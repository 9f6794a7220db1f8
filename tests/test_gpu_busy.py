"""The GPU busy share: samples taken in a thread through the sweep, averaged per GPU. NVML's
numbers are fed by hand here (no GPU on the test machines); on one, `nvml_reader` reads them."""

from __future__ import annotations

import ctypes.util
import itertools
import json
import time
from pathlib import Path

import pytest
from sweep_helpers import import_script

from artefact.config_files import PROFILES, dump_yaml, load_config
from artefact.gpu_busy import BUSY_FILE, GpuBusySampler, latest_busy, nvml_reader, record_busy, report_line
from bench.sweeps import gpu_busy_shares


def test_the_busy_share_is_each_gpus_mean_utilisation_while_sampling() -> None:
    readings = itertools.cycle([[100.0, 50.0], [0.0, 50.0]])  # GPU 0 busy every other second
    with GpuBusySampler(lambda: next(readings), interval_s=0.01) as busy:
        deadline = time.monotonic() + 5
        while len(busy.samples) < 10 and time.monotonic() < deadline:
            time.sleep(0.01)
    taken = len(busy.samples)
    time.sleep(0.05)
    assert len(busy.samples) == taken >= 10, "sampling goes on after the block"
    expected_gpu0 = sum(sample[0] for sample in busy.samples) / taken / 100  # 0.5, or just above if taken is odd
    assert busy.shares() == pytest.approx([expected_gpu0, 0.5])
    assert abs(expected_gpu0 - 0.5) <= 0.5 / taken
    # The sweep prints one line, which the benchmark's sweep item reads back.
    line = report_line([0.874, 0.5])
    assert line.endswith("GPU 0 87%, GPU 1 50%")
    assert gpu_busy_shares(f"trials: 4\n{line}\nresults: …") == [0.87, 0.5]
    assert gpu_busy_shares("trials: 4\n") is None


def test_a_failed_reading_is_skipped_and_without_a_reader_nothing_is_sampled() -> None:
    calls = itertools.count()

    def flaky() -> list[float]:
        if next(calls) % 2:
            raise RuntimeError("GPU has fallen off the bus")
        return [80.0]

    with GpuBusySampler(flaky, interval_s=0.01) as busy:
        while len(busy.samples) < 3:
            time.sleep(0.01)
    assert busy.shares() == pytest.approx([0.8])
    with GpuBusySampler(None, interval_s=0.01) as idle:
        time.sleep(0.05)
    assert idle.shares() is None


@pytest.mark.skipif(ctypes.util.find_library("nvidia-ml") is not None, reason="this machine has NVIDIA's driver")
def test_without_nvidias_driver_there_is_no_reader() -> None:
    assert nvml_reader() is None


# A V100S node's profile with a tiny encoder and CPUs to spare: memory and CPUs allow 10
# trials per GPU, so the busy share (or, unmeasured, the cap of 4) decides.
TINY_V100S = [
    "resources.gpus_per_worker=auto",
    "sweep.encoders=[tu-test_convnext]",
    "resources.node_cpus=64",
    "resources.gpu_arch=null",
]


def _record(results: Path, sweep: str, overrides: list[str], trials: int, shares: list[float], age_s: int) -> Path:
    """What a sweep of the profile with ``overrides`` wrote ``age_s`` ago, having run 2 trials
    per GPU on a node of 2 GPUs."""
    ran = load_config(PROFILES / "v100s-x2.yaml", [*overrides, "resources.gpus_per_worker=0.5"])
    path = record_busy(results / sweep, ran, places=4, gpus=2, trials=trials, shares=shares)
    record = json.loads(path.read_text())
    assert record["trials_per_gpu"] == 2 and record["finished"] == pytest.approx(time.time(), abs=60)
    path.write_text(json.dumps({**record, "finished": record["finished"] - age_s}))
    return path


def test_auto_packs_by_the_busy_share_the_last_sweep_of_the_same_shape_measured(tmp_path: Path) -> None:
    results = tmp_path / "results"
    said: list[str] = []

    def packing(overrides: list[str] = TINY_V100S) -> float:
        said.clear()
        cfg = load_config(PROFILES / "v100s-x2.yaml", overrides, log=said.append, results=results)
        return cfg.resources.gpus_per_worker

    assert packing() == 0.25 and "at most 4 until a sweep like this one has measured" in said[-1]
    _record(results, "half-idle", TINY_V100S, trials=24, shares=[0.5, 0.7], age_s=400)
    # 2 per GPU kept them 60% busy: 3 per GPU would keep them 90% busy.
    assert packing() == 0.3333
    assert "3 trial(s) per GPU" in said[-1] and "sweep half-idle kept its GPUs 60% busy with 2 per GPU" in said[-1]
    # Newer, but not comparable: another resolution, or too few trials to fill 4 places twice.
    _record(results, "other-shape", [*TINY_V100S, "data.resolution=256"], trials=24, shares=[0.95, 0.95], age_s=300)
    _record(results, "too-few", TINY_V100S, trials=7, shares=[0.95, 0.95], age_s=200)
    assert packing() == 0.3333
    # Nearly idle: 18 per GPU would be needed; auto at most doubles the packing it measured.
    _record(results, "idle", TINY_V100S, trials=8, shares=[0.1, 0.1], age_s=100)
    assert packing() == 0.25 and "sweep idle kept its GPUs 10% busy with 2 per GPU; 18 per GPU would" in said[-1]
    assert said[-1].endswith("and auto at most doubles a measured packing: 4)")
    # The last comparable sweep found its GPUs busy with 2 per GPU: auto packs 2, under the old cap.
    _record(results, "busy", TINY_V100S, trials=8, shares=[0.97, 0.93], age_s=50)
    assert packing() == 0.5 and "sweep busy kept its GPUs 95% busy" in said[-1]
    # Memory still bounds it: a 12 GB GPU holds 3 of these trials, however idle they left it.
    small_gpu = [*TINY_V100S, "resources.gpu_memory_gb=12"]
    _record(results, "small-gpu", small_gpu, trials=24, shares=[0.2, 0.2], age_s=10)
    assert packing(small_gpu) == 0.3333 and "room for 3" in said[-1]


def test_a_resumed_sweep_keeps_the_packing_it_started_with(tmp_path: Path) -> None:
    """A sweep's trials must not change how they share GPUs halfway (and --resume refuses a
    changed config): the saved choice wins over any measurement made since."""
    results = tmp_path / "results"
    _record(results, "busy", TINY_V100S, trials=8, shares=[0.97, 0.93], age_s=0)
    started = load_config(PROFILES / "v100s-x2.yaml", TINY_V100S)
    saved = results / "interrupted" / "config.yaml"
    saved.parent.mkdir()
    saved.write_text(dump_yaml(started))
    said: list[str] = []
    resumed = load_config(PROFILES / "v100s-x2.yaml", TINY_V100S, log=said.append, results=results, resumed=saved)
    assert started.resources.gpus_per_worker == resumed.resources.gpus_per_worker == 0.25
    assert said == [f"resources.gpus_per_worker = auto: 0.25, as the sweep chose when it started ({saved})"]
    assert load_config(PROFILES / "v100s-x2.yaml", TINY_V100S, results=results).resources.gpus_per_worker == 0.5


def test_the_record_counts_the_trials_that_ran_on_a_gpu_at_once(tmp_path: Path) -> None:
    """Ray fits whole trials on a GPU (0.4 of one: 2), and the cluster's CPUs may run fewer."""
    packed = load_config(PROFILES / "v100s-x2.yaml", [*TINY_V100S, "resources.gpus_per_worker=0.4"])
    for places, per_gpu in ((5, 2), (2, 1)):
        path = record_busy(tmp_path / f"places-{places}", packed, places=places, gpus=2, trials=12, shares=[0.5, 0.5])
        assert json.loads(path.read_text())["trials_per_gpu"] == per_gpu
    ddp = load_config(PROFILES / "v100s-x2-ddp.yaml")
    assert ddp.resources.workers_per_trial == 2
    assert record_busy(tmp_path / "ddp", ddp, places=1, gpus=2, trials=4, shares=[0.9, 0.9]) is None
    assert not (tmp_path / "ddp").exists()


def test_a_busy_record_that_cannot_be_read_is_skipped_naming_it(tmp_path: Path, bad_input_tried) -> None:
    results = tmp_path / "results"
    good = _record(results, "good", TINY_V100S, trials=24, shares=[0.45, 0.45], age_s=100)
    for name, text in (("truncated", good.read_text()[:40]), ("fields", '{"sweep": "x"}'), ("empty", "")):
        (results / name).mkdir()
        (results / name / BUSY_FILE).write_text(text)
    (results / "folder" / BUSY_FILE).mkdir(parents=True)
    said: list[str] = []
    cfg = load_config(PROFILES / "v100s-x2.yaml", TINY_V100S)
    measured = latest_busy(results, cfg, said.append)
    assert measured is not None and measured.sweep == "good" and measured.trials_for_goal() == 4
    skipped = {line.split()[1].rstrip(":"): line for line in said}
    assert sorted(skipped) == [str(results / name / BUSY_FILE) for name in ("empty", "fields", "folder", "truncated")]
    assert "cannot be read" in skipped[str(results / "folder" / BUSY_FILE)]
    for name in ("empty", "fields", "truncated"):
        assert "not a GPU busy record" in skipped[str(results / name / BUSY_FILE)]
    bad_input_tried("unreadable gpu_busy.json in the results folder")


def test_the_main_job_packs_by_the_sweeps_in_its_results_folder(tmp_path: Path, capsys) -> None:
    encoder_bench = import_script("encoder_bench")
    results = tmp_path / "results"
    _record(results, "half-idle", TINY_V100S, trials=24, shares=[0.6, 0.6], age_s=0)
    overrides = [arg for override in TINY_V100S for arg in ("--set", override)]
    argv = ["--profile", "v100s-x2", *overrides, "--set", "model.pretrained=false", "--results", str(results)]
    assert encoder_bench.main([*argv, "--check=elsewhere"]) == 0
    out = capsys.readouterr().out
    assert "resources.gpus_per_worker = auto: 0.3333 (3 trial(s) per GPU;" in out, out
    assert "sweep half-idle kept its GPUs 60% busy with 2 per GPU; 3 per GPU would keep them 90% busy)" in out
