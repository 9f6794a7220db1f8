"""A whole sweep, end to end: preflight, data, Ray, Tune, MLflow and the report.

Every check that can fail on user input runs before the Ray cluster starts (``preflight``).
Whatever happens after, the sweep's MLflow runs are closed (never left RUNNING) and the
local Ray cluster this process started is shut down.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import shutil
import threading
from pathlib import Path

from artefact.cli import UI_HOST, UI_PORT
from artefact.config import SweepRequest
from artefact.config_files import dump_yaml
from artefact.data.cache import cache_params, fold_names, fold_sizes, is_cache
from artefact.data.prepare import ensure_cache
from artefact.errors import SweepInterrupted, TrackingLost, UserError
from artefact.gpu_busy import GpuBusySampler, nvml_reader, record_busy, report_line
from artefact.predict import log_best
from artefact.preflight import check_results_folder, validate
from artefact.report.comparison import verdicts
from artefact.report.figures import optuna_figures
from artefact.report.folds import fold_markdown, fold_rows, render_fold_text, write_folds
from artefact.report.leaderboard import failed_trials, leaderboard, render_text, write_leaderboard, write_plots
from artefact.report.pareto import describe_front, front_markdown, front_rows, write_pareto
from artefact.tracking.store import delete_sweep, finish_sweep, log_sweep_artifacts, log_sweep_metrics, open_sweep
from artefact.tracking.trials import (
    close_open_trials,
    close_replaced_trials,
    close_trial,
    trial_histories,
    unsent_records,
)
from artefact.tracking.vocabulary import (
    STORE_PATIENCE_S,
    UNSENT_FOLDER,
    SweepRun,
    patiently,
    run_page,
    unless_store_is_away,
)
from artefact.tune import cluster
from artefact.tune.ray_env import sweep_token_file
from artefact.tune.results import summarise
from artefact.tune.space import space_description, trial_count
from artefact.tune.tuner import (
    STOP_ASKED,
    can_resume,
    fail_orphaned_study_trials,
    max_concurrent_trials,
    optuna_storage,
    run_trials,
)

PLOTS_FOLDER = "plots"


def _with_cache_split(request: SweepRequest) -> SweepRequest:
    """A prepared cache given as --data fixes the split: record the cache's values, not the
    profile's. Its folds are used where the sweep asks for them (``data.cv``), and must match."""
    path = request.cfg.data.path
    if path is None or not is_cache(Path(path)):
        return request
    params = cache_params(Path(path))
    asked, built = request.cfg.data.cv, params.pop("cv", None)
    if asked is not None and asked != built:
        raise UserError(
            f"--cv {asked}: the prepared cache {path} has {f'folds by {built}' if built else 'no folds'};"
            f" prepare it again with --cv {asked}, or pass its raw source as --data."
        )
    return dataclasses.replace(request, cfg=request.cfg.replace(data=params))


def run(request: SweepRequest, log=print) -> list[dict[str, object]]:
    """Run (or resume) the sweep and return its leaderboard rows."""
    request = _with_cache_split(request)
    cfg = request.cfg
    sweep_dir = validate(request)
    cache = ensure_cache(cfg.data, request.workspace, log)
    folds = fold_names(cache) if cfg.data.cv else []
    if folds:
        check_results_folder(request.results, cfg, len(folds))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / "config.yaml").write_text(dump_yaml(cfg))
    (sweep_dir / "space.json").write_text(json.dumps(space_description(cfg), indent=2))
    described = [sweep_dir / "config.yaml", sweep_dir / "space.json", sweep_dir / "profile.yaml"]
    if folds:
        described.append(sweep_dir / "folds.json")
        described[-1].write_text(json.dumps({"cv": cfg.data.cv, "folds": fold_sizes(cache)}, indent=2))
    tracking = open_sweep(
        request.tracking_uri,
        request.name,
        {"profile": request.profile, "mode": cfg.sweep.mode},
    )
    status = "FAILED"
    store_answers = True
    stopping_ray: threading.Thread | None = None
    try:
        shutil.copyfile(request.profile_file, sweep_dir / "profile.yaml")
        log_sweep_artifacts(tracking, described)
        dashboard = cluster.connect(request.address, request.verbose)
        if dashboard:
            token = sweep_token_file(request.results, request.name)
            log(f"Ray dashboard: {dashboard} (when it asks for a token, paste the contents of {token})")
        log(f"sweep {request.name}: {cfg.sweep.mode} mode, profile {request.profile}, results in {sweep_dir}")
        resources = cluster.resources()
        log(f"Ray cluster: {resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs")
        if folds:
            log(f"cross-validation by {cfg.data.cv}: {len(folds)} folds, each holding out one of {', '.join(folds)}")
        places = max_concurrent_trials(cfg, resources)
        with GpuBusySampler(nvml_reader() if cfg.resources.gpus_per_worker > 0 else None) as busy:
            results = run_trials(
                cfg, cache, sweep_dir, request.name, tracking, request.resume, places, request.verbose, len(folds)
            )
        busy_shares = busy.shares()
        if busy_shares is not None:  # this node's GPUs only: the other nodes' are not sampled
            log(report_line(busy_shares))
            shares = {f"gpu/busy_share/{i}": share for i, share in enumerate(busy_shares)}
            unless_store_is_away(lambda: log_sweep_metrics(tracking, shares))
        stopping_ray = cluster.stop_meanwhile()
        finished = results.num_terminated + results.num_errors
        asked = trial_count(cfg, len(folds))
        if finished < asked or STOP_ASKED.is_set():  # a trial stopped mid-way counts as terminated
            status = "KILLED"
            raise SweepInterrupted(
                f"sweep {request.name!r} stopped before all {asked} trials finished; its state is saved."
                f" Continue it with the same command plus --resume --name {request.name}."
            )
        if busy_shares is not None and not request.resume:  # resumed: the shares miss its start
            try:
                record_busy(sweep_dir, cfg, places, resources.get("GPU", 0), finished, busy_shares)
            except OSError as error:  # only a later sweep's packing needs it: the results come first
                log(f"the GPU busy share was not recorded for gpus_per_worker: auto ({error})")
        try:
            histories = patiently(lambda: trial_histories(tracking), STORE_PATIENCE_S)
        except Exception as error:  # the store's errors come in many types (vocabulary.py)
            store_answers = False
            raise _tracking_lost(request, sweep_dir, error) from None
        summaries = summarise(results, histories, cfg)
        _close_trials(tracking, summaries)
        replaced = close_replaced_trials(tracking, histories, {s.trial_id for s in summaries})
        if cfg.sweep.mode == "search":
            fail_orphaned_study_trials(sweep_dir, request.name)
        rows = leaderboard(summaries, cfg.sweep.mode, cfg.resources.gpus_per_worker > 0)
        judged = verdicts(summaries) if cfg.sweep.mode == "fair" else ([], [])
        by_fold = fold_rows(summaries, folds) if folds else []
        front = front_rows(summaries, cfg.sweep.objectives) if cfg.sweep.objectives else []
        appendix = (fold_markdown(by_fold, folds) if by_fold else "") + (
            front_markdown(front, cfg.sweep.objectives) if front else ""
        )
        files = write_leaderboard(rows, summaries, cfg.sweep.mode, sweep_dir, judged, appendix)
        if front:
            files.append(write_pareto(front, cfg.sweep.objectives, sweep_dir))
        log_sweep_artifacts(tracking, files)
        plots = _write_plots(request, rows, summaries, histories, sweep_dir / PLOTS_FOLDER, log)
        if by_fold:
            *tables, heatmap = write_folds(by_fold, folds, sweep_dir, sweep_dir / PLOTS_FOLDER, cfg.data.cv)
            files += tables
            log_sweep_artifacts(tracking, tables)
            plots.append(heatmap)
        log_sweep_artifacts(tracking, plots, PLOTS_FOLDER)
        best_model = log_best(tracking, summaries, cfg.sweep.metric)
        status = "FINISHED"
        log("\n" + render_text(rows, cfg.sweep.mode))
        if by_fold:
            log("\n" + render_fold_text(by_fold, folds))
        for line in [*judged[1], *(describe_front(front, cfg.sweep.objectives) if front else [])]:
            log(line)
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
        cluster.stop(stopping_ray)
        if status == "FAILED" and not request.resume and not can_resume(sweep_dir):
            # Nothing ran: leave nothing behind, so the same command can simply be run again.
            delete_sweep(tracking)
            shutil.rmtree(sweep_dir, ignore_errors=True)
        elif store_answers:
            close_open_trials(tracking)
            finish_sweep(tracking, status)


def _tracking_lost(request: SweepRequest, sweep_dir: Path, error: Exception) -> TrackingLost:
    """The trials ran but the store never came back: what each run lacks, as its trial
    recorded it, and how to write the report later."""
    lacking = [
        f"run {record['run_id']} (trial {record['trial_id']}) lacks {', '.join(record['unsent'])}"
        for record in unsent_records(sweep_dir / UNSENT_FOLDER)
    ] or ["no trial recorded an epoch missing from its run; the sweep's parent run lacks its report"]
    return TrackingLost(
        "\n".join(
            [
                f"the MLflow store {request.tracking_uri} did not answer for {STORE_PATIENCE_S:.0f} s after the"
                f" trials ended ({type(error).__name__}), so the sweep's report is not written.",
                *lacking,
                f"Tune's results are kept in {sweep_dir}. Once the store answers, the same command with --resume"
                f" --name {request.name} writes the report (the epochs listed stay missing).",
            ]
        )
    )


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
