"""The GPU busy share: samples taken in a thread through the sweep, averaged per GPU. NVML's
numbers are fed by hand here (no GPU on the test machines); on one, `nvml_reader` reads them."""

from __future__ import annotations

import ctypes.util
import itertools
import time

import pytest

from artefact.gpu_busy import GpuBusySampler, nvml_reader, report_line
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
