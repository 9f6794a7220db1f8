"""The compile item: the trial item's run eager, compiled with an empty compile cache, and
compiled again with the cache the first compiled run filled, each in a fresh process as a
sweep's trials on another node (or after a restart) would be. Reports the compile time (a
run's first epoch's training beyond a later epoch's, less the eager run's), step times,
Inductor's cache hits, and the training images a trial needs before compiling pays."""

from __future__ import annotations

import multiprocessing
import shutil
import statistics
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from artefact.config import Config
from artefact.train.compilation import BREAK_EVEN_IMAGES, use_compile_cache
from artefact.train.hardware import select_device

RUNS = (("eager", False), ("cold", True), ("warm", True))


def measure_compile(cfg: Config, cache: Path, workdir: Path) -> dict[str, object]:
    """Three runs of ``cfg`` (at least two epochs: the first compiles, the later ones are steady)."""
    cfg = cfg.replace(train={"epochs": max(2, cfg.train.epochs)})
    if select_device(cfg.train.device).type == "cpu" and shutil.which("g++") is None:
        return {"skipped": "no g++: TorchInductor compiles CPU kernels with it (Debian: apt install g++)"}
    folder = workdir / "compile-cache"
    spawn = multiprocessing.get_context("spawn")  # a fresh interpreter: nothing compiled in memory
    runs = {}
    for name, compiled in RUNS:
        with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as child:
            runs[name] = child.submit(_run, cfg.replace(train={"compile": compiled}), cache, folder).result()
        print(f"  {name}: {runs[name]}", flush=True)
    eager_step = runs["eager"]["step_s"]
    saving_per_image = (eager_step - runs["warm"]["step_s"]) / cfg.train.batch_size
    # A first epoch is slower eager too (allocator, kernel choice): only the rest is compiling.
    cold, warm = (runs[name]["first_epoch_extra_s"] - runs["eager"]["first_epoch_extra_s"] for name in ("cold", "warm"))
    return {
        "encoder": cfg.model.encoder,
        "resolution": cfg.data.resolution,
        "batch_size": cfg.train.batch_size,
        "device": runs["eager"]["device"],
        "runs": runs,
        "cold_compile_s": round(cold, 2),
        "warm_compile_s": round(warm, 2),
        "step_gain": round(eager_step / runs["warm"]["step_s"] - 1, 3),
        "break_even_images_cold": round(cold / saving_per_image) if saving_per_image > 0 else None,
        "break_even_images_warm": round(warm / saving_per_image) if saving_per_image > 0 else None,
        "auto_break_even_images": BREAK_EVEN_IMAGES,
        "cache_mb": round(sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20, 1),
    }


class _Quiet:
    def report(self, metrics, checkpoint, evaluation) -> None:
        pass


def _run(cfg: Config, cache: Path, folder: Path) -> dict[str, object]:
    """In the child process: one run with the compile cache at ``folder``."""
    use_compile_cache(folder)
    from torch._dynamo.utils import counters

    from artefact.data.dataset import TrainDataset
    from artefact.train.loop import train
    from artefact.train.timing import EpochClock, training_seconds
    from bench.throughput import steps_per_epoch

    clock = EpochClock()
    metrics = train(cfg, cache, _Quiet(), clock=clock)
    training = [training_seconds(epoch) for epoch in clock.epochs]
    steady = statistics.median(training[1:])
    steps = steps_per_epoch(cfg, TrainDataset(cache, cfg.data.resolution, cfg.data.crops_per_image))
    return {
        "device": select_device(cfg.train.device).type,
        "compiled": bool(metrics["perf/compiled"]),
        "first_epoch_extra_s": round(training[0] - steady, 2),
        "step_s": round(steady / steps, 4),
        "fx_graph_cache_hits": counters["inductor"]["fxgraph_cache_hit"],
        "fx_graph_cache_misses": counters["inductor"]["fxgraph_cache_miss"],
    }
