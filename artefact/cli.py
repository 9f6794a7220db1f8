"""``python -m artefact``: run the sweep, prepare data, generate synthetic data, download, train once."""

from __future__ import annotations

import argparse
import errno
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from artefact.errors import SweepInterrupted, UserError

DEFAULT_WORKSPACE = Path("data")
LOOPBACK = ("127.0.0.1", "localhost", "::1")
UI_HOST, UI_PORT = "127.0.0.1", 5000
"""Where ``python -m artefact ui`` serves unless told otherwise."""


OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EPERM}
"""A full disk or an unwritable folder met mid-run: the user's to fix, so no traceback."""


def run_cli(main: Callable[[], int]) -> int:
    """Print a UserError without a traceback, one ``error:`` line per problem, and exit
    with code 2 (3 for an interrupted sweep that can be resumed, 4 for one whose MLflow store
    never came back)."""
    try:
        return main()
    except SweepInterrupted as error:
        print(f"stopped: {error}", file=sys.stderr)
        return SweepInterrupted.exit_code
    except UserError as error:
        for problem in str(error).splitlines():
            print(f"{error.label}: {problem}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as error:
        if error.errno not in OUTPUT_ERRNOS:
            raise
        print(
            f"error: cannot write {error.filename or 'the output'} ({error.strerror}); free some space or fix the"
            " folder's permissions, then run the same command again (a sweep with --resume).",
            file=sys.stderr,
        )
        return 2


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (1-65535)")
    return int(text)


def _parser() -> argparse.ArgumentParser:
    from artefact.config import DataConfig
    from artefact.config_files import project_folder
    from artefact.data.sources.synthetic import DEFAULT_COUNT

    store = f"$MLFLOW_TRACKING_URI, else sqlite:///{project_folder() / 'mlflow' / 'mlflow.db'}"
    parser = argparse.ArgumentParser(prog="python -m artefact", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    # Listed here for --help; main() hands its arguments to the main job's own parser.
    commands.add_parser(
        "sweep", add_help=False, help="run the main job, as sweeps/encoder_bench.py does (sweep --help: its flags)"
    )

    prepare = commands.add_parser("prepare", help="build a training cache from parquet shards or a folder")
    prepare.add_argument("--source", type=Path, required=True, help="parquet shards folder or folder layout")
    prepare.add_argument("--out", type=Path, required=True, help="cache folder to create (or reuse)")
    prepare.add_argument(
        "--max-side", type=int, default=DataConfig.max_side, help="longest image side in the cache (px)"
    )
    prepare.add_argument("--val-fraction", type=float, default=DataConfig.val_fraction)
    prepare.add_argument("--holdout", help="leave one group out: material=<value> or content=<value>")
    prepare.add_argument(
        "--augment-copies",
        type=int,
        default=DataConfig.augment_copies,
        help="offline flip/rot90 copies on the train side",
    )
    prepare.add_argument("--split-seed", type=int, default=DataConfig.split_seed)
    prepare.add_argument("--cv", help="also build cross-validation folds: content, material or kfold:K")
    prepare.add_argument("--max-pixels", type=int, default=DataConfig.max_pixels, help="decompression-bomb bound")

    synth = commands.add_parser("synth", help="write a synthetic ARTeFACT-shaped data set")
    synth.add_argument("--out", type=Path, required=True)
    synth.add_argument("--count", type=int, default=DEFAULT_COUNT)
    synth.add_argument("--layout", choices=("folder", "parquet"), default="folder")
    synth.add_argument("--seed", type=int, default=0)

    download = commands.add_parser("download", help="fetch the ARTeFACT parquet shards from the Hugging Face hub")
    download.add_argument("--out", type=Path, required=True)

    ui = commands.add_parser("ui", help="serve the MLflow UI on the default store (127.0.0.1:5000)")
    ui.add_argument("--tracking-uri", help=f"MLflow backend store URI; default: {store}")
    ui.add_argument("--host", default=UI_HOST, help="bind address; anything but loopback exposes your runs")
    ui.add_argument("--port", type=_port, default=UI_PORT)
    ui.add_argument(
        "--artifacts-destination",
        help="where runs logged through this server keep artifacts; default: beside a SQLite store",
    )
    ui.add_argument(
        "--auth-folder",
        type=Path,
        help="ask for a password: MLflow's basic-auth app, one user 'artefact' with the password in"
        " FOLDER/password (folder mode 700, file mode 600); clients set MLFLOW_TRACKING_USERNAME and"
        " MLFLOW_TRACKING_PASSWORD. The SLURM job uses it on several nodes.",
    )

    weights = commands.add_parser(
        "weights",
        help="fetch encoders' pretrained weights into the Hugging Face cache, or check that they are there",
        description="fetch: download the weights that are not cached yet, with a progress bar (needs network: run"
        " it on a login node; compute nodes read the cache offline). check: list each encoder as cached or missing;"
        " exit code 0 when all are cached, 2 otherwise. The cache is huggingface_hub's, as timm and SMP read it:"
        " $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub.",
    )
    weights.add_argument("action", choices=("fetch", "check"))
    chosen = weights.add_mutually_exclusive_group(required=True)
    chosen.add_argument("--profile", help="the encoders of a profile: a shipped profile's name or a YAML path")
    chosen.add_argument("--encoders", help="comma-separated encoders, e.g. convnext_tiny,mit_b3 (aliases work)")

    allocation = commands.add_parser("allocation", help="the sbatch resource flags for a profile's node (for cluster/)")
    allocation.add_argument("--profile", required=True, help="a shipped profile's name or a YAML path")

    train = commands.add_parser("train", help="one training run in this process (no Ray)")
    train.add_argument("--config", type=Path, help="YAML config (a profile's YAML file works too)")
    train.add_argument("overrides", nargs="*", help="section.field=value, e.g. train.epochs=5 model.arch=upernet")
    train.add_argument("--out", type=Path, default=Path("results/train"), help="checkpoints and resolved config")
    train.add_argument("--workspace", type=Path, default=DEFAULT_WORKSPACE, help="where data caches live")
    train.add_argument("--resume", action="store_true", help="continue from OUT/latest/checkpoint.pt")

    predict = commands.add_parser(
        "predict",
        help="segment a folder of images with a sweep's best model",
        description="Writes OUT/masks/<stem>.png (fine class ids 0-15, each image's own size) and"
        " OUT/overlays/<stem>.png (damage in the official colours), replacing files of the same names.",
    )
    predict.add_argument("--run", required=True, help="best:<sweep name>, or the MLflow run id of a trial with a model")
    predict.add_argument("--images", type=Path, required=True, help="a folder of images (its subfolders are skipped)")
    predict.add_argument("--out", type=Path, required=True, help="where masks/ and overlays/ are written")
    predict.add_argument("--tracking-uri", help=f"MLflow store; default: {store}")
    predict.add_argument("--max-pixels", type=int, default=DataConfig.max_pixels, help="decompression-bomb bound")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["sweep"]:
        from artefact.sweep_cli import main as sweep

        return sweep(argv[1:], prog="python -m artefact sweep")
    args = _parser().parse_args(argv)
    return run_cli(lambda: _dispatch(args))


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "prepare":
        import dataclasses

        from artefact.config import DataConfig
        from artefact.data.prepare import PrepareParams, params_from, prepare

        # Validated as a DataConfig (ranges, holdout syntax); the smallest resolution admits any max side.
        flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(PrepareParams)}
        prepare(args.source, args.out, params_from(DataConfig(**flags, resolution=32)))
    elif args.command == "synth":
        from artefact.data.sources.synthetic import generate

        generate(args.out, count=args.count, layout=args.layout, seed=args.seed)
        print(f"wrote {args.count} synthetic samples to {args.out} ({args.layout} layout)")
    elif args.command == "download":
        from artefact.data.sources.parquet import download

        print(f"downloaded to {download(args.out)}")
    elif args.command == "train":
        _train(args)
    elif args.command == "ui":
        return _serve_ui(args)
    elif args.command == "allocation":
        print(" ".join(_allocation_flags(args.profile)))
    elif args.command == "weights":
        _weights(args)
    elif args.command == "predict":
        _predict(args)
    return 0


def _weights(args: argparse.Namespace) -> None:
    from huggingface_hub import constants

    from artefact.config_files import load_config, profile_file
    from artefact.errors import Problems
    from artefact.weights import check_cached, fetch_missing, resolve_all

    if args.profile:
        names = list(load_config(profile_file(args.profile)[1]).sweep.encoders)
    else:
        names = [name.strip() for name in args.encoders.split(",") if name.strip()]
        if not names:
            raise UserError("--encoders: give one or more encoder names, e.g. --encoders convnext_tiny,mit_b3.")
    problems = Problems()  # an unknown name is reported with, not instead of, the others' state
    encoders = resolve_all(names, problems)
    with problems.check():
        if args.action == "check":
            check_cached(encoders, log=print)
        else:
            fetch_missing(encoders)
    problems.raise_any()
    print(f"all {len(encoders)} encoders' weights are in the Hugging Face cache {constants.HF_HUB_CACHE}")


def _allocation_flags(profile: str) -> list[str]:
    """What one node of the profile needs from SLURM: one task with its CPUs, GPUs and memory."""
    from artefact.config_files import load_config, profile_file

    resources = load_config(profile_file(profile)[1]).resources
    flags = ["--ntasks-per-node=1", f"--cpus-per-task={resources.node_cpus}", f"--mem={resources.node_memory_gb}G"]
    if resources.node_gpus:
        flags.append(f"--gres=gpu:{resources.node_gpus}")
    return flags


def _serve_ui(args: argparse.Namespace) -> int:
    """``mlflow server`` without its job runner (2 processes instead of 10, ready in ~5 s),
    with MLflow's basic-auth app given ``--auth-folder``."""
    environment = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    auth = []
    if args.auth_folder is not None:
        from artefact.tracking.server_auth import auth_server_environment

        environment.update(auth_server_environment(args.auth_folder))
        auth = ["--app-name", "basic-auth"]
    exposed = args.host not in LOOPBACK
    if exposed and not auth:
        print(
            f"warning: serving MLflow on {args.host}: anyone who can reach it can read and change your runs.",
            file=sys.stderr,
        )
    from artefact.config_files import default_tracking_uri

    uri = args.tracking_uri or default_tracking_uri()
    destination = args.artifacts_destination
    if destination is None:
        from artefact.tracking.vocabulary import sqlite_artifact_root

        root = sqlite_artifact_root(uri)
        destination = str(root) if root is not None else None
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        uri,
        "--host",
        args.host,
        "--port",
        str(args.port),
    ]
    if destination:
        command += ["--artifacts-destination", destination]
    if exposed:  # MLflow answers 403 to any Host header it was not told about
        hosts = [args.host, "localhost", "127.0.0.1"]
        command += ["--allowed-hosts", ",".join(f"{h},{h}:{args.port}" for h in hosts)]
    print(f"MLflow UI: http://{args.host}:{args.port}  (Ctrl-C to stop)")
    return subprocess.call(command + auth, env=environment)


def _predict(args: argparse.Namespace) -> None:
    # Read when MLflow is imported: its INFO lines and download bars would bury predict's own bar.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if args.max_pixels < 1:
        raise UserError(f"--max-pixels {args.max_pixels}: give a positive number of pixels.")
    from artefact.config_files import default_tracking_uri
    from artefact.predict import predict

    predict(args.run, args.images, args.out, args.tracking_uri or default_tracking_uri(), args.max_pixels)


def _train(args: argparse.Namespace) -> None:
    from artefact.config_files import dump_yaml, load_config

    # Check the config and the model before the heavy imports, the data preparation and
    # any output, so a typo fails in a second and leaves nothing behind.
    cfg = load_config(args.config, args.overrides)
    from artefact.train.checkpoint import CHECKPOINT_FILE

    resume = args.out / "latest" / CHECKPOINT_FILE
    if args.resume and not resume.is_file():
        raise UserError(f"--resume: no checkpoint at {resume}; run without --resume first.")
    from artefact.models import build_model

    build_model(cfg.model, cfg.data.resolution)

    from artefact.data.prepare import ensure_cache
    from artefact.train.loop import train
    from artefact.train.reporters import LocalReporter

    cache = ensure_cache(cfg.data, args.workspace)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "config.yaml").write_text(dump_yaml(cfg))
    reporter = LocalReporter(args.out, cfg.sweep.metric, resume=args.resume)
    metrics = train(cfg, cache, reporter, resume_from=resume if args.resume else None)
    print(f"done: val/miou_fine {metrics.get('val/miou_fine', float('nan')):.4f}; checkpoints in {args.out}")
