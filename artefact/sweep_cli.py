"""The main job: an encoder and hyperparameter sweep on ARTeFACT.

With no arguments on a machine without a GPU or data, it runs the cpu-smoke profile on
the built-in synthetic data set and prints a leaderboard. With --data and a GPU profile
it runs the real sweep. Everything is logged to MLflow (see `python -m artefact ui`).
From a checkout: python sweeps/encoder_bench.py; from an installed package: python -m artefact sweep.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from pathlib import Path

from artefact.cli import run_cli
from artefact.config import Config, SweepRequest
from artefact.config_files import (
    PROFILES,
    SweepFlags,
    absolute_sqlite,
    default_tracking_uri,
    load_config,
    profile_file,
    project_folder,
)
from artefact.errors import UserError
from artefact.heap import collector_paused

SWEEP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
PROG = "python sweeps/encoder_bench.py"


def parse_args(argv: list[str] | None = None, prog: str = PROG) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    project = project_folder()
    shipped = ", ".join(sorted(path.stem for path in PROFILES.glob("*.yaml")))
    parser.add_argument(
        "--profile",
        help=f"a shipped profile ({shipped})\nor a YAML path; default: laptop with a GPU, cpu-smoke without",
    )
    parser.add_argument(
        "--data",
        help="a raw source (parquet shards or folder layout) or a prepared cache;\n"
        "default: the built-in synthetic data set",
    )
    parser.add_argument(
        "--mode",
        choices=("fair", "search"),
        help="fair: every encoder, same config, N seeds;\nsearch: Optuna TPE with ASHA early stopping",
    )
    parser.add_argument(
        "--encoders",
        help="comma-separated encoders: timm names (tu-<name> or bare), SMP's own (mit_b3, ...)\n"
        "or aliases convnext_tiny, swin_tiny, coatnet_0, maxvit_tiny, segformer_b0..b5",
    )
    parser.add_argument("--trials", type=int, help="search: number of trials")
    parser.add_argument("--seeds", type=int, help="fair: seeds per encoder")
    parser.add_argument("--epochs", type=int, help="epochs per trial")
    parser.add_argument(
        "--objectives",
        help="search on two or more objectives at once (comma-separated: miou_fine,\nmiou_coarse, miou_binary,"
        " img_per_s, peak_mem_mb,\ngpu_hours) and report their Pareto front; ASHA is off"
        " (it stops\ntrials on one metric)",
    )
    parser.add_argument(
        "--cv",
        help="fair: cross-validate every encoder x seed on folds: content (hold each content\ntype out),"
        " material (each material) or kfold:K (K folds of source images)",
    )
    parser.add_argument(
        "--name", help="sweep name (MLflow experiment, results/<name>); default: first free\n<profile>-<mode>-<n>"
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const="always",
        choices=("always", "auto"),
        help="continue the sweep --name after an interruption; --resume=auto continues it\n"
        "if it has saved state and starts it otherwise (what a requeued SLURM job runs)",
    )
    parser.add_argument(
        "--tracking-uri",
        help=f"MLflow tracking URI; default: $MLFLOW_TRACKING_URI, else sqlite:///{project / 'mlflow' / 'mlflow.db'}",
    )
    parser.add_argument("--address", help="join an existing Ray cluster (host:port of the head)")
    parser.add_argument(
        "--results", type=Path, default=project / "results", help=f"results folder (default: {project / 'results'})"
    )
    parser.add_argument(
        "--workspace", type=Path, default=project / "data", help=f"data caches (default: {project / 'data'})"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override any config field, e.g. --set train.lr=3e-4 (repeatable)",
    )
    parser.add_argument("--verbose", action="store_true", help="show Ray's own logs")
    parser.add_argument(
        "--check",
        nargs="?",
        const="here",
        choices=("here", "elsewhere"),
        help="only check the profile, flags and config (encoders, pretrained weights, GPU memory,\n"
        "--data, ...), print every problem found, then exit; starts nothing. --check (=here) also\n"
        "checks that this machine's GPUs work for the profile; --check=elsewhere skips that, for\n"
        "trials that run on other machines (cluster/submit.sh runs it on the login node)",
    )
    return parser.parse_args(argv)


def resolve_profile(name: str | None) -> tuple[str, Path]:
    if name is None:
        import torch

        name = "laptop" if torch.cuda.is_available() else "cpu-smoke"
        print(f"no --profile given: using {name} ({'a GPU' if name == 'laptop' else 'no GPU'} detected)")
    return profile_file(name)


def build_config(args: argparse.Namespace) -> tuple[str, Path, Config]:
    """(profile name, profile file, config): the profile with the flags and --set applied."""
    profile, path = resolve_profile(args.profile)
    flags = SweepFlags(
        args.mode, args.encoders, args.trials, args.seeds, args.epochs, args.data, args.objectives, args.cv
    )
    results = args.results.resolve()
    saved = results / args.name / "config.yaml" if args.resume and args.name else None
    resumed = saved if saved is not None and saved.is_file() else None
    return profile, path, load_config(path, args.overrides, flags, log=print, results=results, resumed=resumed)


def build_request(args: argparse.Namespace) -> SweepRequest:
    profile, path, cfg = build_config(args)
    if not args.address:  # before the store and token file exist, and before Ray is imported
        from artefact.train.hardware import check_cuda_usable

        check_cuda_usable(cfg.resources.gpus_per_worker, profile)
    results, workspace = args.results.resolve(), args.workspace.resolve()
    tracking_uri = absolute_sqlite(args.tracking_uri) if args.tracking_uri else default_tracking_uri()
    name = args.name or _free_name(results, tracking_uri, f"{profile}-{cfg.sweep.mode}")
    return SweepRequest(
        cfg=cfg,
        profile=profile,
        profile_file=path,
        name=name,
        results=results,
        workspace=workspace,
        tracking_uri=tracking_uri,
        address=args.address,
        resume=args.resume == "always",
        verbose=args.verbose,
    )


def _free_name(results: Path, tracking_uri: str, stem: str) -> str:
    """The first <stem>-<n> used neither by a results folder nor by a sweep in the MLflow store."""
    from artefact.tracking.store import check_store, sweep_exists

    check_store(tracking_uri)
    number = 1
    while (results / f"{stem}-{number}").exists() or sweep_exists(tracking_uri, f"{stem}-{number}"):
        number += 1
    return f"{stem}-{number}"


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    """The main job; ``prog`` is how the user called it, for its help and errors."""
    args = parse_args(argv, prog)

    def go() -> int:
        if not args.verbose:
            # Read on import: MLflow announces routine steps at INFO, and Tune's newer console
            # output prints a configuration box even at verbose=0 (the older one prints nothing).
            os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
            os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # the sweep prints its own
            os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # logging the best model
            os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        if args.resume and not args.name:
            raise UserError("--resume needs --name: the sweep to continue.")
        if args.name is not None and not SWEEP_NAME.fullmatch(args.name):
            raise UserError(f"--name {args.name!r}: use letters, digits, '.', '_' and '-' only (it names folders).")
        if args.check:
            with collector_paused():  # the torch stack loads in here
                from artefact.preflight import check_config

                profile, _, cfg = build_config(args)
            check_config(cfg, profile if args.check == "here" and not args.address else None)
            print(f"ok: profile {profile}, {cfg.sweep.mode} mode, encoders {', '.join(cfg.sweep.encoders)}")
            return 0
        with collector_paused():  # the torch, MLflow and Ray stacks load in here
            request = build_request(args)
            from artefact.tune.ray_env import DRIVER_ENV, prepare_local_cluster, sweep_token_file

            for name, value in DRIVER_ENV.items():
                os.environ.setdefault(name, value)
            if not request.address:
                prepare_local_cluster(sweep_token_file(request.results, request.name))
            import optuna

            from artefact.sweep import run  # imports Ray, which reads the settings just made

        if not args.verbose:  # Optuna announces every study and trial at INFO
            optuna.logging.set_verbosity(optuna.logging.WARNING)
        if args.resume == "auto":
            from artefact.tune.tuner import can_resume

            request = dataclasses.replace(request, resume=can_resume(request.results / request.name))

        run(request)
        return 0

    return run_cli(go)
