"""What runs a trial's training loop under Ray and reports it: to Ray Train on each worker
of a DDP trial, or to Ray Tune directly for a one-worker trial; on rank 0 also to the
trial's MLflow child run (``TrialReporter``)."""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import ray.train
import torch
from ray import tune

from artefact.config import Config
from artefact.errors import TrialFailure, UserError
from artefact.tracking.trials import TrialRun
from artefact.tracking.vocabulary import unless_store_is_away
from artefact.train.checkpoint import CHECKPOINT_FILE, EpochCheckpoint, copy_atomic, load_checkpoint
from artefact.train.compilation import compile_cache_folder, use_compile_cache
from artefact.train.loop import train
from artefact.train.reporters import TrialReporter, trial_params
from artefact.tune.trial import TrialContext


def send_to_train(metrics: dict[str, float], checkpoint: EpochCheckpoint | None) -> None:
    """Ray Train writes the checkpoint and copies it into the trial's storage in its upload
    thread, and the next epoch starts at once: for ConvNeXt-T's 365 MB that took 0.7 s and
    1.0 s of a CPU epoch (docs/performance.md). The metrics reach Tune after the copy, and
    Train waits for the last copy when the trial's loop returns."""
    mode = ray.train.CheckpointUploadMode.ASYNC
    if checkpoint is None:
        ray.train.report(metrics, checkpoint_upload_mode=mode)
        return
    folder = Path(tempfile.mkdtemp(prefix="artefact-ckpt-"))
    storage = ray.train.get_context().get_storage()
    held = [checkpoint]  # let go once copied: Train keeps this function until Tune has the report

    def write_and_copy(local: ray.train.Checkpoint, name: str) -> ray.train.Checkpoint:
        try:  # Train may call it again if the copy fails (object stores' throttling)
            held[0].write(folder)
            persisted = storage.persist_current_checkpoint(local, name)
        except BaseException:  # Train deletes the folder only after a copy that worked
            shutil.rmtree(folder, ignore_errors=True)
            raise
        held.clear()
        return persisted

    local = ray.train.Checkpoint.from_directory(str(folder))
    try:
        ray.train.report(metrics, checkpoint=local, checkpoint_upload_mode=mode, checkpoint_upload_fn=write_and_copy)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def send_to_tune(metrics: dict[str, float], checkpoint: EpochCheckpoint | None) -> None:
    if checkpoint is None:
        tune.report(metrics)
        return
    with checkpoint.written() as folder:
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(folder)))


def train_worker(cfg: Config, context: TrialContext, trial_id: str) -> None:
    """The per-worker entry point of a DDP trial's TorchTrainer."""
    run = None
    if ray.train.get_context().get_world_rank() == 0 and context.sweep is not None:
        run = TrialRun(context.sweep, trial_id, trial_params(cfg))
    reporter = TrialReporter(run, cfg, send_to_train, context.cache)
    _train_and_report(cfg, context, reporter, ray.train.get_checkpoint())


def train_in_trial(cfg: Config, context: TrialContext, trial_id: str) -> None:
    """A one-worker trial, trained in the Tune trial's own process.

    Tune reuses that process for the next trial, so the torch stack is imported once per
    process instead of once per trial, and no Train controller or worker actors start
    (see docs/performance.md). Tune restarts a failed trial from its last checkpoint, as
    Train would.
    """
    run = TrialRun(context.sweep, trial_id, trial_params(cfg)) if context.sweep is not None else None
    try:
        reporter = TrialReporter(run, cfg, send_to_tune, context.cache)
        _train_and_report(cfg, context, reporter, tune.get_checkpoint())
    finally:
        if torch.cuda.is_available():  # the next trial in this process gets the memory back
            torch.cuda.empty_cache()


def _train_and_report(
    cfg: Config, context: TrialContext, reporter: TrialReporter, checkpoint: ray.train.Checkpoint | None
) -> None:
    """Train from the last good checkpoint, with the sweep's compiled code at hand; a failure
    that a restart would repeat (NaN loss, out of memory) is recorded, and a restarted
    attempt of that trial fails at once."""
    if context.name is not None:
        use_compile_cache(compile_cache_folder(context.name))
    run = reporter.run
    if run is not None and run.earlier_failure:
        _raise_recorded(run.earlier_failure)
    try:
        with _restored(checkpoint, run) as resume_from:
            train(cfg, context.cache, reporter, resume_from=resume_from, clock=reporter.clock)
    except TrialFailure as failure:
        if run is not None:
            run.record_failure(f"{type(failure).__name__}: {failure}")
        raise
    finally:  # also when Tune ends the trial inside a report (ASHA, or its last epoch)
        reporter.close()
        if run is not None and context.unsent is not None:
            run.record_unsent(context.unsent)


def _raise_recorded(reason: str) -> None:
    name, _, message = reason.partition(": ")
    kinds = {kind.__name__: kind for kind in TrialFailure.__subclasses__()}
    raise kinds.get(name, TrialFailure)(message)


@contextmanager
def _restored(checkpoint: ray.train.Checkpoint | None, run: TrialRun | None) -> Iterator[Path | None]:
    """A local copy of the newest readable checkpoint file of a Ray checkpoint's trial, or
    None for a fresh start. A corrupt one is named (on stderr and in the MLflow run) and
    the previous one is used instead."""
    if checkpoint is None:
        yield None
        return
    folder = Path(tempfile.mkdtemp(prefix="artefact-resume-"))
    try:
        with checkpoint.as_directory() as latest:
            problems = []
            for candidate in _newest_first(Path(latest), Path(checkpoint.path)):
                try:
                    load_checkpoint(candidate)
                except UserError as error:
                    problems.append(str(error))
                    continue
                copy_atomic(candidate, folder / CHECKPOINT_FILE)
                break
            else:
                raise UserError(f"no readable checkpoint to resume this trial from: {' '.join(problems)}")
        if problems:
            note = f"{' '.join(problems)} Resumed from the previous checkpoint, {candidate}."
            print(note, file=sys.stderr)
            if run is not None:
                unless_store_is_away(lambda: run.note_resume(note))
        yield folder / CHECKPOINT_FILE
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _newest_first(latest: Path, stored: Path) -> list[Path]:
    """The latest checkpoint's file, then those of the older checkpoints kept beside it
    (Tune and Train name them ``checkpoint_<counter or time>``, which sorts by age)."""
    older = sorted((p for p in stored.parent.glob("checkpoint_*") if p.is_dir() and p.name < stored.name), reverse=True)
    return [latest / CHECKPOINT_FILE, *(p / CHECKPOINT_FILE for p in older)]
