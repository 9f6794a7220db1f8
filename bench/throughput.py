"""Images per second: a bare PyTorch loop, our training loop (in-process and under Ray
Train), the data pipeline alone, and the GPU's model FLOP utilisation (MFU)."""

from __future__ import annotations

import math
import multiprocessing
import os
import queue
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import wait
from multiprocessing.context import SpawnProcess
from multiprocessing.queues import Queue
from pathlib import Path

import torch

from artefact.config import Config
from artefact.data.dataset import TrainDataset, load_split
from artefact.losses import MultitaskLoss
from artefact.models import TRAINING_FLOP_FACTOR, build_model, forward_gflop
from artefact.taxonomy import HEAD_LUTS
from artefact.train.compilation import compiles
from artefact.train.hardware import amp_dtype, configure_kernels, peak_tflops, select_device
from artefact.train.loop import Ranks, make_train_loader, train


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(step: Callable[[], None], steps: int, warmup: int, device: torch.device) -> float:
    """Seconds for ``steps`` calls of ``step`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    _synchronise(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    _synchronise(device)
    return time.perf_counter() - started


def steps_per_epoch(cfg: Config, train_set: TrainDataset) -> int:
    """The training steps of one epoch, as the loop takes them (whole batches, capped)."""
    batches = len(train_set) // cfg.train.batch_size
    return min(batches, cfg.train.steps_per_epoch or batches)


def loop_options(cfg: Config, planned_steps: int) -> tuple[torch.dtype | None, dict[str, bool]]:
    """(AMP dtype, memory-format and compile options) that the bare loop shares with our loop
    when ours plans ``planned_steps`` training steps (``train.compile: auto`` depends on them)."""
    device = select_device(cfg.train.device)
    compiled = compiles(cfg.train.compile, device, planned_steps * cfg.train.batch_size)
    return amp_dtype(cfg.train.amp, device), {"channels_last": cfg.train.channels_last, "compile_model": compiled}


def bare_step(
    cfg: Config,
    dtype: torch.dtype | None,
    batch_size: int | None = None,
    channels_last: bool = False,
    compile_model: bool = False,
) -> Callable[[], None]:
    """The baseline's training step: the same model, loss and AMP, on one batch already on
    the device; forward, backward, the recipe's gradient clipping and an AdamW step, nothing
    else."""
    device = select_device(cfg.train.device)
    configure_kernels(device)
    batch = batch_size or cfg.train.batch_size
    resolution = cfg.data.resolution
    model = build_model(cfg.model, resolution).to(device)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, resolution, resolution, generator=generator).to(device)
    fine = torch.randint(0, 16, (batch, resolution, resolution), generator=generator).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    net = torch.compile(model) if compile_model else model
    criterion = MultitaskLoss(cfg.loss.weights(cfg.model.heads), cfg.loss.kind)  # unweighted: no cache here
    targets = {head: torch.from_numpy(HEAD_LUTS[head]).to(device)[fine].long() for head in criterion.head_weights}
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            outputs = net(images)
        loss, _ = criterion(outputs, targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        scaler.step(optimizer)
        scaler.update()

    return step


def bare_step_speed(
    cfg: Config,
    dtype: torch.dtype | None,
    steps: int,
    warmup: int = 3,
    batch_size: int | None = None,
    channels_last: bool = False,
    compile_model: bool = False,
) -> dict[str, float]:
    """Images per second of ``bare_step`` (and its peak GPU memory, on a GPU)."""
    device = select_device(cfg.train.device)
    batch = batch_size or cfg.train.batch_size
    step = bare_step(cfg, dtype, batch, channels_last, compile_model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = timed_steps(step, steps, warmup, device)
    result = {"img_per_s": batch * steps / seconds, "batch_size": batch}
    if device.type == "cuda":
        result["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


class _LastMetrics:
    """A training-loop reporter that keeps only the last epoch's metrics."""

    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}

    def report(self, metrics, checkpoint, evaluation) -> None:
        self.metrics = metrics


def measured_config(cfg: Config, cache: Path, steps: int) -> Config:
    """Two epochs of ``steps`` steps, with enough crops per image for that many: the first
    epoch warms up (workers, cuDNN, allocator), the second is the one measured."""
    crops = math.ceil(steps * cfg.train.batch_size / len(load_split(cache, "train")))
    return cfg.replace(
        train={"epochs": 2, "steps_per_epoch": steps},
        data={"crops_per_image": max(cfg.data.crops_per_image, crops)},
    )


def loop_speed(cfg: Config, cache: Path, steps: int) -> float:
    """Our training loop, in this process: training img/s of its second epoch."""
    reporter = _LastMetrics()
    train(measured_config(cfg, cache, steps), cache, reporter)
    return reporter.metrics["perf/img_per_s"]


RAY_TRAIN_PATIENCE_S = 300.0
"""A Ray Train row takes 30-60 s wherever it finished. On a lent H100 it twice never did (the
driver waited in ``ray.get`` for 210 s, then 230 s, with the GPU in the cluster's resources); past this
the row is reported as failed, with the end of Ray's logs, and the benchmark goes on."""

RAY_START_PATIENCE_S = 180.0
"""Starting the driver process and Ray takes about 15 s on 2 cores; this is for a machine that
cannot start Ray at all."""


class RayTrainFailed(RuntimeError):
    """The Ray Train row did not finish; the message holds the end of Ray's logs."""


def ray_train_speed(cfg: Config, cache: Path, steps: int, cpus: int, patience_s: float = RAY_TRAIN_PATIENCE_S) -> float:
    """Our training loop under Ray Train, one worker holding ``cpus`` CPUs (the whole machine,
    as the in-process run has), on a local cluster started and stopped here.

    Ray is driven from a child process in a session of its own, so a stalled row ends with the
    whole session killed. A driver thread left waiting in this process would, once
    ``ray.shutdown`` ran, touch Ray's shut-down core worker, and Ray then ends the whole
    process: the benchmark would die in a later item (seen in CI)."""
    spawn = multiprocessing.get_context("spawn")  # CUDA may already be initialised here
    messages = spawn.Queue()
    # Made and removed here: a killed driver cannot clean up after itself.
    with tempfile.TemporaryDirectory(prefix="artefact-perf-ray-", ignore_cleanup_errors=True) as storage:
        driver = spawn.Process(
            target=_drive_ray_train,
            args=(cfg, cache, steps, cpus, Path(storage), messages),
            name="ray-train-row",
        )
        driver.start()
        logs, kind = None, "failed"
        try:
            kind, value = _next_message(driver, messages, RAY_START_PATIENCE_S, "starting Ray")
            if kind == "logs":
                logs = Path(value)
                kind, value = _next_message(driver, messages, patience_s, "training")
        finally:
            exitcode = _end_driver(driver, shutdown_s=60 if kind in ("result", "error") else 0)
    if kind == "result":
        return value
    if kind == "exited":
        value = f"its driver process exited with code {exitcode} while {value}"
    raise RayTrainFailed(f"Ray Train did not finish ({value}). The end of Ray's logs:\n{_log_tails(logs)}")


def _next_message(driver: SpawnProcess, messages: Queue, patience_s: float, doing: str) -> tuple[str, object]:
    """The driver's next message; ``("exited", doing)`` if it died without one, ``("failed",
    why)`` if it stayed silent too long. A dead driver is not reaped here, so its pid (the
    session id that ``_end_driver`` kills) cannot be reused meanwhile."""
    deadline = time.monotonic() + patience_s
    while (left := deadline - time.monotonic()) > 0:
        try:
            return messages.get(timeout=min(left, 1.0))
        except queue.Empty:
            if wait([driver.sentinel], timeout=0):
                try:  # a message sent just before it exited
                    return messages.get(timeout=1.0)
                except queue.Empty:
                    return "exited", doing
    return "failed", f"no result after {patience_s:.0f} s of {doing}"


def _drive_ray_train(cfg: Config, cache: Path, steps: int, cpus: int, storage: Path, messages: Queue) -> None:
    """The child process: a session of its own (Ray's processes stay in it), Ray's log folder
    sent first, then the measured img/s or the error."""
    os.setsid()
    _die_with_the_benchmark()
    import ray

    from artefact.tune.ddp import build_trainer
    from artefact.tune.trial import TrialContext

    run_cfg = measured_config(cfg, cache, steps).replace(
        resources={"workers_per_trial": 1, "cpus_per_worker": cpus, "gpus_per_worker": cfg.resources.gpus_per_worker}
    )
    context = ray.init(
        num_cpus=cpus,
        num_gpus=torch.cuda.device_count(),
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        logging_level="WARNING",
        log_to_driver=False,
    )
    messages.put(("logs", str(Path(context.address_info["session_dir"]) / "logs")))
    try:
        result = build_trainer(run_cfg, TrialContext(cache, storage), "perf").fit()
        messages.put(("result", result.metrics["perf/img_per_s"]))
    except Exception as error:  # reported by the parent, with Ray's logs
        messages.put(("error", f"{type(error).__name__}: {error}"))
    finally:
        ray.shutdown()


def _die_with_the_benchmark() -> None:
    """Out of the benchmark's process group, the driver and Ray would outlive a benchmark killed
    from outside (a CI timeout). A thread waits for the benchmark's end and then kills this
    session; Ray's own fate sharing (the kernel's parent-death signal) left the dashboard agent
    running here for more than a minute."""

    def watch() -> None:
        wait([multiprocessing.parent_process().sentinel])
        _kill_session(os.getsid(0), sparing=os.getpid())
        os._exit(1)

    threading.Thread(target=watch, name="benchmark-watch", daemon=True).start()


def _end_driver(driver: SpawnProcess, shutdown_s: float) -> int | None:
    """Give a driver that answered ``shutdown_s`` to stop Ray and exit, then SIGKILL what is
    left in its session, reap it and return its exit code."""
    wait([driver.sentinel], timeout=shutdown_s)  # not reaped yet: its session id stays its own
    _kill_session(driver.pid)
    driver.kill()  # in case it had not yet made its session
    driver.join()
    exitcode = driver.exitcode
    driver.close()
    return exitcode


def _kill_session(session: int, sparing: int | None = None, within_s: float = 10) -> None:
    """SIGKILL the live processes of ``session`` but ``sparing``, again until none is left (a
    raylet may start a worker meanwhile). Ray's workers make process groups of their own but
    stay in the session, so a process-group kill misses them (seen here: a worker left running
    after its raylet was killed)."""
    deadline = time.monotonic() + within_s
    while _kill_session_once(session, sparing) and time.monotonic() < deadline:
        time.sleep(0.2)


def _kill_session_once(session: int, sparing: int | None) -> int:
    killed = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _parent, _group, session_id = stat.read_text().rsplit(")", 1)[1].split()[:4]
            if int(session_id) == session and state != "Z" and int(stat.parent.name) != sparing:
                os.kill(int(stat.parent.name), signal.SIGKILL)
                killed += 1
        except (OSError, ValueError):  # gone meanwhile
            pass
    return killed


def _log_tails(logs: Path | None, lines: int = 12, limit: int = 6000) -> str:
    """The last lines of every Ray log that holds something: the workers' and actors' stderr
    (Ray Train's own messages among them) and the raylet's."""
    if logs is None:
        return "(none: Ray did not start)"
    parts = []
    for path in [*sorted(logs.glob("*.err")), logs / "raylet.out"]:
        if path.is_file() and path.stat().st_size:
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append("\n".join([f"--- {path.name}", *tail]))
    return "\n".join(parts)[-limit:] or f"(nothing in {logs})"


def pipeline_speed(cfg: Config, cache: Path, workers: int, batches: int) -> float:
    """Images per second that the real Dataset and DataLoader deliver (reading, cropping,
    augmenting, collating), with no model: the first batch (worker start) is not timed."""
    device = select_device(cfg.train.device)
    run_cfg = cfg.replace(data={"num_workers": workers})
    dataset = TrainDataset(cache, cfg.data.resolution, cfg.data.crops_per_image, cfg.data.in_memory)
    loader = make_train_loader(run_cfg, dataset, Ranks(), device)
    delivered, started = 0, None
    while delivered < batches:
        for _batch in loader:
            if started is None:
                started = time.perf_counter()
                continue
            delivered += 1
            if delivered >= batches:
                break
    return batches * cfg.train.batch_size / (time.perf_counter() - started)


def mfu(img_per_s: float, train_gflop_per_image: float, peak: float | None) -> float | None:
    """Model FLOP utilisation: achieved training FLOP/s over the device's peak (TFLOP/s)."""
    if peak is None:
        return None
    return img_per_s * train_gflop_per_image / (peak * 1e3)


def gpu_row(cfg: Config, dtype: torch.dtype, steps: int, **options) -> dict[str, object]:
    """One model at one precision on the GPU: img/s, peak memory and MFU."""
    device = torch.device("cuda")
    gflop = TRAINING_FLOP_FACTOR * forward_gflop(cfg.model, cfg.data.resolution)
    row: dict[str, object] = {
        "arch": cfg.model.arch,
        "encoder": cfg.model.encoder,
        "dtype": str(dtype).removeprefix("torch."),
        "channels_last": options.get("channels_last", False),
        "compile": options.get("compile_model", False),
        "resolution": cfg.data.resolution,
        "train_gflop_per_image": round(gflop, 2),
    }
    try:
        row.update(bare_step_speed(cfg, dtype, steps, warmup=5, **options))
        row["mfu"] = mfu(row["img_per_s"], gflop, peak_tflops(torch.cuda.get_device_name(device), dtype))
    except torch.cuda.OutOfMemoryError:
        row["error"] = "out of memory"
    finally:
        torch.cuda.empty_cache()
    return row
