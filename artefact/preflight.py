"""Every check before anything starts: the config (encoders, pretrained weights, GPU memory,
GPU architecture, data path, fault plans, the SLURM allocation), the results folder's disk
space, the sweep's name and the tracking store. Every check that can fail on user input runs
here, before the Ray cluster starts, and reports every problem it finds, one line each.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import tempfile
from pathlib import Path

import torch

from artefact.config import Config, SweepRequest
from artefact.config_files import read_yaml
from artefact.config_tree import flatten, to_dict
from artefact.errors import Problems, UserError
from artefact.gpu_memory import check_fits
from artefact.models import count_parameters, meta_model
from artefact.tracking.store import check_store, sweep_exists
from artefact.train.checkpoint import sweep_checkpoint_bytes
from artefact.train.faults import fault_plans
from artefact.train.hardware import check_arch_built, check_cuda_usable, check_gpu_supported
from artefact.tune.space import trial_count
from artefact.tune.tuner import can_resume, max_concurrent_trials
from artefact.weights import check_pretrained, resolve_all


def allocation_resources() -> dict[str, float] | None:
    """The CPUs and GPUs of the SLURM allocation this process runs in, None outside one.

    Counted as cluster/ray_node.sh gives them to Ray (every node like this one), so a sweep
    that cannot fit fails before the job starts any server.
    """
    if "SLURM_JOB_ID" not in os.environ:
        return None
    nodes = int(os.environ.get("SLURM_JOB_NUM_NODES", "1"))
    cpus = int(os.environ.get("SLURM_CPUS_ON_NODE") or os.cpu_count() or 1)
    gpus = len([device for device in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if device])
    return {"CPU": float(nodes * cpus), "GPU": float(nodes * gpus)}


def check_config(cfg: Config, local_profile: str | None = None) -> None:
    """The checks of a config alone (no results folder, store or cluster): encoders, their
    pretrained weights, GPU memory, GPU architecture, data path and, inside a SLURM job, that
    one trial fits the allocation. Every problem is reported, one line each, so that one
    run shows them all. ``encoder_bench.py --check`` runs just these, naming
    ``local_profile`` when the trials will run on this machine: its GPUs must work here."""
    problems = Problems()
    encoders = resolve_all(cfg.sweep.encoders, problems)
    resolve_all(cfg.sweep.encoder_max_batch, problems)
    with problems.check():
        check_fits(cfg)
    with problems.check():
        check_pretrained(cfg.model.pretrained, encoders)
    with problems.check():
        fault_plans()
    if local_profile is not None:
        with problems.check():
            check_cuda_usable(cfg.resources.gpus_per_worker, local_profile)
    if torch.cuda.is_available():
        with problems.check():
            check_gpu_supported(torch.device("cuda"))
    with problems.check():
        check_arch_built(cfg.resources.gpu_arch)
    if cfg.data.cv is not None and cfg.sweep.mode != "fair":
        problems.add(
            f"--cv {cfg.data.cv} needs --mode fair: folds compare encoders on one fixed configuration."
            " Search on one split first, then cross-validate its best encoders with --mode fair --cv."
        )
    if "gpu_hours" in cfg.sweep.objectives and cfg.resources.gpus_per_worker == 0:
        problems.add(
            "sweep.objectives: gpu_hours is 0 for every trial of a profile without GPUs"
            " (resources.gpus_per_worker = 0); use img_per_s to weigh speed on CPU."
        )
    if cfg.data.path is not None and not Path(cfg.data.path).exists():
        problems.add(f"--data {cfg.data.path}: no such file or folder.")
    allocation = allocation_resources()
    if allocation is not None:
        with problems.check():
            max_concurrent_trials(cfg, allocation)
    problems.raise_any()


def check_results_folder(results: Path, cfg: Config, folds: int = 0) -> None:
    """An unwritable or full results folder fails here, before any training, rather than at
    the first checkpoint of every trial. A ``--cv`` sweep's folds are known once its cache
    is prepared, and it is checked again then, with ``folds``."""
    try:
        results.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=results):
            pass
    except OSError as error:
        raise UserError(
            f"--results {results}: cannot write there ({error.strerror});"
            " fix its permissions or pass another --results."
        ) from None
    parameters = max(
        count_parameters(meta_model(dataclasses.replace(cfg.model, encoder=e), cfg.data.resolution))
        for e in cfg.sweep.encoders
    )
    need = sweep_checkpoint_bytes(parameters, trial_count(cfg, folds))
    free = shutil.disk_usage(results).free
    if free < need:
        raise UserError(
            f"--results {results}: {free / 2**20:.1f} MB free, but the sweep's checkpoints need about"
            f" {need / 2**20:.1f} MB; free some space or pass --results on another disk."
        )


def validate(request: SweepRequest) -> Path:
    """All user-input checks that need no cluster; returns the sweep folder. A sweep that
    starts its own cluster trains here, so this machine's GPUs must work for a GPU profile."""
    check_config(request.cfg, request.profile if request.address is None else None)
    check_results_folder(request.results, request.cfg)
    sweep_dir = request.results / request.name
    if request.resume:
        if not can_resume(sweep_dir):
            raise UserError(f"--resume: no earlier sweep named {request.name!r} in {request.results}; drop --resume.")
        _check_same_config(request, sweep_dir / "config.yaml")
    elif sweep_dir.exists():
        raise UserError(f"sweep {request.name!r} already exists in {sweep_dir}; pass --resume or another --name.")
    if request.address:
        _check_reachable(request.address)
    check_store(request.tracking_uri)
    if not request.resume and sweep_exists(request.tracking_uri, request.name):
        raise UserError(
            f"the MLflow store {request.tracking_uri} already has a sweep named {request.name!r};"
            " pass another --name (or --resume it if its results folder still exists)."
        )
    return sweep_dir


def _check_same_config(request: SweepRequest, saved_file: Path) -> None:
    """A resumed sweep must train on the same data, split and space as before: a changed split
    would let resumed trials be scored on images they were trained on."""
    saved = flatten(read_yaml(saved_file)) if saved_file.is_file() else {}
    current = flatten(to_dict(request.cfg))
    changed = sorted(key for key in saved.keys() | current.keys() if saved.get(key) != current.get(key))
    if changed:
        details = ", ".join(f"{key}: {saved.get(key)!r} -> {current.get(key)!r}" for key in changed[:6])
        raise UserError(
            f"--resume: sweep {request.name!r} ran with another config ({details}). Resume with the same"
            " profile and flags, or start a new sweep with --name."
        )


def _check_reachable(address: str) -> None:
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=5):
            pass
    except (OSError, ValueError) as error:
        raise UserError(
            f"--address {address}: no Ray head answers there ({error}). Start one (`ray start --head`) or"
            " drop --address to run a local cluster."
        ) from None
