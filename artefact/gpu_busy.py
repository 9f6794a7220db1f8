"""How busy a sweep kept its GPUs: NVML's utilisation of each GPU this node may use, sampled
through the sweep. NVML's figure is the share of its last sample period (1/6 s to 1 s, by
GPU) in which any kernel ran, so its mean over the sweep is the share of the wall time in
which the GPU was busy. Where trials leave a GPU idle (loading data, validating, logging),
packing more trials per GPU (``resources.gpus_per_worker``) is the cheap fix.

Each GPU sweep records what it measured in its results folder (``BUSY_FILE``), so that
``gpus_per_worker: auto`` can pack a later sweep of the same shape by it.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from artefact.config import Config

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


BUSY_FILE = "gpu_busy.json"
BUSY_GOAL = 0.9
"""The busy share ``gpus_per_worker: auto`` packs for: past it, another trial per GPU mostly
shares the GPU's time with the others rather than adding to it."""


@dataclass(frozen=True)
class BusyMeasurement:
    """What a sweep of ``shape`` that ran from start to end without a resume measured: the
    busy share of each GPU of its (first) node, with ``trials_per_gpu`` trials on a GPU at
    a time, ``places`` trials at a time in all, ``trials`` trials run, ``finished`` then."""

    sweep: str
    finished: float
    shape: dict[str, object]
    trials_per_gpu: float
    places: int
    trials: int
    shares: list[float]

    @property
    def busy(self) -> float:
        return sum(self.shares) / len(self.shares)

    def trials_wanted(self) -> int:
        """Trials per GPU that would keep the GPUs ``BUSY_GOAL`` busy if each kept a GPU as
        busy as the measured ones did (an upper bound: packed trials also wait for each other)."""
        return max(1, math.ceil(self.trials_per_gpu * BUSY_GOAL / max(self.busy, 1e-3) - 1e-9))

    def trials_for_goal(self) -> int:
        """``trials_wanted``, but at most twice the packing measured: one misleading
        measurement costs one sweep, and the next sweep measures the new packing."""
        return max(1, min(self.trials_wanted(), math.floor(2 * self.trials_per_gpu + 1e-9)))


def sweep_shape(cfg: Config) -> dict[str, object]:
    """What a trial's GPU busy share depends on and a later sweep can compare: the data, the
    model, its images, loader and batches, AMP and compiling, and the GPU (its memory and
    architecture)."""
    return {
        "data": cfg.data.path,
        "arch": cfg.model.arch,
        "heads": list(cfg.model.heads),
        "encoders": sorted(cfg.sweep.encoders),
        "mode": cfg.sweep.mode,
        "batch_size": cfg.train.batch_size,
        "batch_sizes": sorted(cfg.sweep.batch_sizes),
        "encoder_max_batch": dict(sorted(cfg.sweep.encoder_max_batch.items())),
        "resolution": cfg.data.resolution,
        "crops_per_image": cfg.data.crops_per_image,
        "num_workers": cfg.data.num_workers,
        "cpus_per_worker": cfg.resources.cpus_per_worker,
        "amp": cfg.train.amp,
        "channels_last": cfg.train.channels_last,
        "compile": cfg.train.compile,
        "gpu_memory_gb": cfg.resources.gpu_memory_gb,
        "gpu_arch": cfg.resources.gpu_arch,
    }


def record_busy(
    sweep_dir: Path, cfg: Config, places: int, gpus: float, trials: int, shares: list[float]
) -> Path | None:
    """Write to ``sweep_dir / BUSY_FILE`` what a sweep measured that ran ``places`` trials at
    a time on ``gpus`` GPUs; None where its trials do not share GPUs one per worker (DDP, or
    a trial on more than one GPU)."""
    from artefact.train.checkpoint import write_atomic  # imports torch, which the sweep has loaded

    share = cfg.resources.gpus_per_worker
    if cfg.resources.workers_per_trial != 1 or not 0 < share <= 1 or gpus <= 0:
        return None
    # Ray fits whole trials on a GPU, and the cluster's CPUs may allow fewer at a time.
    per_gpu = min(math.floor(1 / share + 1e-6), places / gpus)
    measurement = BusyMeasurement(sweep_dir.name, time.time(), sweep_shape(cfg), per_gpu, places, trials, shares)
    text = json.dumps(asdict(measurement), indent=2).encode()
    return write_atomic(sweep_dir / BUSY_FILE, lambda file: file.write(text))


def latest_busy(results: Path, cfg: Config, log: Callable[[str], None]) -> BusyMeasurement | None:
    """The last finished measurement in ``results/*/BUSY_FILE`` of a sweep of ``cfg``'s shape
    that ran at least twice as many trials as it had places (with fewer, places stood empty
    and the GPUs idled for want of trials, not of work). A file that cannot be read is
    skipped with a line to ``log`` naming it."""
    shape = sweep_shape(cfg)
    found: list[BusyMeasurement] = []
    for path in results.glob(f"*/{BUSY_FILE}"):
        try:
            measurement = BusyMeasurement(**json.loads(path.read_text()))
            usable = measurement.shape == shape and measurement.trials >= 2 * measurement.places > 0
            usable = usable and measurement.busy > 0 and float(measurement.finished) > 0
        except OSError as error:
            log(f"skipping {path}: it cannot be read ({error}); fix its permissions or delete it")
            continue
        except (ValueError, TypeError, ZeroDivisionError) as error:
            log(f"skipping {path}: not a GPU busy record ({error}); delete it, or rerun that sweep to write it again")
            continue
        if usable:
            found.append(measurement)
    return max(found, key=lambda measurement: measurement.finished) if found else None
