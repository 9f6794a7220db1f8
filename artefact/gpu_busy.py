"""How busy a sweep kept its GPUs: NVML's utilisation of each GPU this node may use, sampled
through the sweep. NVML's figure is the share of its last sample period (1/6 s to 1 s, by
GPU) in which any kernel ran, so its mean over the sweep is the share of the wall time in
which the GPU was busy. Where trials leave a GPU idle (loading data, validating, logging),
packing more trials per GPU (``resources.gpus_per_worker``) is the cheap fix.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

SAMPLE_INTERVAL_S = 1.0
REPORT_PREFIX = "GPU busy while the trials ran, on this node: "
"""How the sweep's output line starts (the benchmark's sweep item reads it)."""

Reader = Callable[[], list[float]]
"""Returns each GPU's utilisation in percent, in a fixed order."""


class GpuBusySampler:
    """Samples ``read`` every ``interval_s`` in a thread while in its ``with`` block; does
    nothing when ``read`` is None (no GPU or no NVML)."""

    def __init__(self, read: Reader | None, interval_s: float = SAMPLE_INTERVAL_S) -> None:
        self.read = read
        self.interval_s = interval_s
        self.samples: list[list[float]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> GpuBusySampler:
        if self.read is not None:
            self._thread = threading.Thread(target=self._sample, name="gpu-busy-sampler", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        if self._thread is not None:  # a hung NVML call must not hold up the sweep's end
            self._thread.join(timeout=self.interval_s + 5)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.samples.append(self.read())
            except Exception:  # a GPU fallen off the bus must not end the sweep; its gap is visible
                continue

    def shares(self) -> list[float] | None:
        """Each GPU's busy share of the sampled time (0-1), or None without samples."""
        if not self.samples:
            return None
        return [sum(column) / len(column) / 100 for column in zip(*self.samples, strict=True)]


def nvml_reader() -> Reader | None:
    """NVML's utilisation of the GPUs this process may use (``CUDA_VISIBLE_DEVICES``, by
    UUID, or by index taken in NVML's PCI-bus order, which is SLURM's with ``AutoDetect=nvml``),
    or None where NVML or its driver library is missing."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no nvidia-ml-py, or no driver: pynvml.NVMLError_LibraryNotFound
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        if visible is None:
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        else:
            handles = [
                pynvml.nvmlDeviceGetHandleByUUID(name)
                if name.startswith(("GPU-", "MIG-"))
                else pynvml.nvmlDeviceGetHandleByIndex(int(name))
                for name in (part.strip() for part in visible.split(","))
                if name
            ]
    except (pynvml.NVMLError, ValueError):
        return None
    if not handles:
        return None
    return lambda: [float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu) for handle in handles]


def report_line(shares: list[float]) -> str:
    return REPORT_PREFIX + ", ".join(f"GPU {index} {share:.0%}" for index, share in enumerate(shares))
