"""A whole sweep, end to end: checks, data, Ray, Tune, MLflow and the leaderboard.

Every check that can fail on user input runs before the Ray cluster starts. Whatever
happens after, the sweep's MLflow runs are closed (never left RUNNING) and the local
Ray cluster this process started is shut down.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shlex
import shutil
import socket
import subprocess
import tempfile
import threading
from pathlib import Path

import ray
import torch

from artefact.checkpoint import sweep_checkpoint_bytes
from artefact.cli import UI_HOST, UI_PORT, allocation_resources
from artefact.config import Config, SweepRequest, dump_yaml, flatten, read_yaml, to_dict
from artefact.data.prepare import cache_params, ensure_cache, is_cache
from artefact.errors import Problems, SweepInterrupted, UserError
from artefact.faults import fault_plans
from artefact.figures import optuna_figures
from artefact.hardware import check_cuda_usable, check_gpu_supported
from artefact.memory import check_fits
from artefact.models import count_parameters, meta_model
from artefact.predict import log_best
from artefact.ray_env import TRIAL_ENV
from artefact.report import failed_trials, leaderboard, render_text, write_leaderboard, write_plots
from artefact.search import (
    can_resume,
    fail_orphaned_study_trials,
    max_concurrent_trials,
    optuna_storage,
    run_sweep,
    space_description,
    summarise,
    trial_count,
)
from artefact.tracking import (
    TRIAL_CLIENT_ENV,
    SweepRun,
    check_store,
    close_open_trials,
    close_replaced_trials,
    close_trial,
    delete_sweep,
    finish_sweep,
    log_sweep_artifacts,
    open_sweep,
    run_page,
    sweep_exists,
    trial_histories,
)
from artefact.weights import check_pretrained, resolve_all

PLOTS_FOLDER = "plots"


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
    if cfg.data.path is not None and not Path(cfg.data.path).exists():
        problems.add(f"--data {cfg.data.path}: no such file or folder.")
    allocation = allocation_resources()
    if allocation is not None:
        with problems.check():
            max_concurrent_trials(cfg, allocation)
    problems.raise_any()


def check_results_folder(results: Path, cfg: Config) -> None:
    """An unwritable or full results folder fails here, before any training, rather than at
    the first checkpoint of every trial."""
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
    need = sweep_checkpoint_bytes(parameters, trial_count(cfg))
    free = shutil.disk_usage(results).free
    if free < need:
        raise UserError(
            f"--results {results}: {free / 2**20:.1f} MB free, but the sweep's checkpoints need about"
            f" {need / 2**20:.1f} MB; free some space or pass --results on another disk."
        )


def validate(request: SweepRequest) -> Path:
    """All user-input checks that need no cluster; returns the sweep folder."""
    check_config(request.cfg)
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


def _connect_ray(request: SweepRequest) -> str | None:
    """Join --address, or start a local cluster bound to 127.0.0.1 (environment from ray_env)."""
    quiet = {} if request.verbose else {"logging_level": logging.WARNING, "log_to_driver": False}
    runtime_env = {"env_vars": {**TRIAL_ENV, **TRIAL_CLIENT_ENV}}
    if request.address:
        ray.init(address=request.address, runtime_env=runtime_env, **quiet)
        return None
    context = ray.init(
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        _node_ip_address="127.0.0.1",
        runtime_env=runtime_env,
        **quiet,
    )
    node_address = context.address_info["node_ip_address"]
    if node_address != "127.0.0.1":
        ray.shutdown()
        raise UserError(
            f"the local Ray cluster bound to {node_address} instead of 127.0.0.1; refusing to run a sweep that"
            " other machines could reach. Set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (see artefact/ray_env.py)."
        )
    return f"http://{context.dashboard_url}" if context.dashboard_url else None


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _with_cache_split(request: SweepRequest) -> SweepRequest:
    """A prepared cache given as --data fixes the split: record the cache's values, not the profile's."""
    path = request.cfg.data.path
    if path is None or not is_cache(Path(path)):
        return request
    return dataclasses.replace(request, cfg=request.cfg.replace(data=cache_params(Path(path))))


def run(request: SweepRequest, log=print) -> list[dict[str, object]]:
    """Run (or resume) the sweep and return its leaderboard rows."""
    request = _with_cache_split(request)
    cfg = request.cfg
    sweep_dir = validate(request)
    cache = ensure_cache(cfg.data, request.workspace, log)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / "config.yaml").write_text(dump_yaml(cfg))
    (sweep_dir / "space.json").write_text(json.dumps(space_description(cfg), indent=2))
    tracking = open_sweep(
        request.tracking_uri,
        request.name,
        {"profile": request.profile, "git_commit": git_commit(), "mode": cfg.sweep.mode},
    )
    status = "FAILED"
    stopping_ray: threading.Thread | None = None
    try:
        shutil.copyfile(request.profile_file, sweep_dir / "profile.yaml")
        log_sweep_artifacts(tracking, [sweep_dir / "config.yaml", sweep_dir / "space.json", sweep_dir / "profile.yaml"])
        dashboard = _connect_ray(request)
        if dashboard:
            log(f"Ray dashboard: {dashboard}")
        log(f"sweep {request.name}: {cfg.sweep.mode} mode, profile {request.profile}, results in {sweep_dir}")
        resources = ray.cluster_resources()
        log(f"Ray cluster: {resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs")
        results = run_sweep(cfg, cache, sweep_dir, request.name, tracking, request.resume, request.verbose)
        stopping_ray = _stop_ray_meanwhile()
        finished = results.num_terminated + results.num_errors
        if finished < trial_count(cfg):
            status = "KILLED"
            raise SweepInterrupted(
                f"sweep {request.name!r} stopped before all {trial_count(cfg)} trials finished; its state is saved."
                f" Continue it with the same command plus --resume --name {request.name}."
            )
        histories = trial_histories(tracking)
        summaries = summarise(results, histories, cfg)
        _close_trials(tracking, summaries)
        replaced = close_replaced_trials(tracking, histories, {s.trial_id for s in summaries})
        if cfg.sweep.mode == "search":
            fail_orphaned_study_trials(sweep_dir, request.name)
        rows = leaderboard(summaries, cfg.sweep.mode, cfg.resources.workers_per_trial * cfg.resources.gpus_per_worker)
        files = write_leaderboard(rows, summaries, cfg.sweep.mode, sweep_dir)
        log_sweep_artifacts(tracking, files)
        plots = _write_plots(request, rows, summaries, histories, sweep_dir / PLOTS_FOLDER, log)
        log_sweep_artifacts(tracking, plots, PLOTS_FOLDER)
        best_model = log_best(tracking, summaries, cfg.sweep.metric)
        status = "FINISHED"
        log("\n" + render_text(rows, cfg.sweep.mode))
        counts = {o: sum(s.outcome == o for s in summaries) for o in ("completed", "stopped_early", "failed")}
        log(f"\ntrials: {counts}")
        for line in failed_trials(summaries):
            log(f"  failed {line}")
        for trial_id in replaced:
            log(f"  replaced {trial_id}: it started just before the sweep was killed, after its last saved state")
        for gap in (s for s in summaries if s.unlogged_epochs):
            log(f"  MLflow lacks epochs {gap.unlogged_epochs} of trial {gap.trial_id}: its store was unreachable")
        log(f"results: {sweep_dir}/ ({', '.join(f.name for f in files)}, {PLOTS_FOLDER}/)")
        log(best_model)
        log(_mlflow_hint(request.tracking_uri, tracking))
        return rows
    finally:
        if stopping_ray is not None:
            stopping_ray.join()
        if ray.is_initialized():  # not started, or failed in the thread
            ray.shutdown()
        if status == "FAILED" and not request.resume and not can_resume(sweep_dir):
            # Nothing ran: leave nothing behind, so the same command can simply be run again.
            delete_sweep(tracking)
            shutil.rmtree(sweep_dir, ignore_errors=True)
        else:
            close_open_trials(tracking)
            finish_sweep(tracking, status)


def _stop_ray_meanwhile() -> threading.Thread:
    """Stop Ray while the leaderboard and figures are written, which need no Ray. Its
    shutdown mostly waits (up to 1 s per process for a graceful exit): 1.25 s on 2 cores,
    of which 0.07 s of the driver's CPU."""
    stopping = threading.Thread(target=ray.shutdown, name="ray-shutdown")
    stopping.start()
    return stopping


def _write_plots(request: SweepRequest, rows, summaries, histories, folder: Path, log) -> list[Path]:
    """The leaderboard's plots and, for a search, Optuna's history and parameter importances."""
    cfg = request.cfg
    plots = write_plots(rows, summaries, histories, cfg.sweep.metric, cfg.sweep.mode, folder)
    if cfg.sweep.mode == "search":
        drawn, skipped = optuna_figures(optuna_storage(request.results / request.name), request.name, folder)
        plots += drawn
        for reason in skipped:
            log(f"  no {reason}")
    return plots


def _mlflow_hint(tracking_uri: str, tracking: SweepRun) -> str:
    """Where to look at the sweep in the MLflow UI: a server's page, or how to start the UI."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"MLflow: {run_page(tracking, tracking_uri)}"
    return (
        f"MLflow UI: python -m artefact ui --tracking-uri {shlex.quote(tracking_uri)}\n"
        f"  then open {run_page(tracking, f'http://{UI_HOST}:{UI_PORT}')}"
    )


def _close_trials(tracking: SweepRun, summaries) -> None:
    for summary in summaries:
        close_trial(tracking, summary.trial_id, summary.outcome, summary.reason, summary.best_checkpoint)
