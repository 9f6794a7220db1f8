"""Profiles, flags and ``--set`` overrides into a ``Config``, and back into YAML.

Safe YAML only, so a profile cannot build Python objects; the main job's flags and the
``a.b=value`` overrides are merged over the profile before one validation, so every error
names its field once.
"""

from __future__ import annotations

import importlib.resources
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from artefact.config import Config, from_dict
from artefact.config_tree import deep_merge, to_dict
from artefact.errors import UserError


def read_yaml(path: Path) -> dict[str, Any]:
    """Safe YAML only: tags that would build Python objects are refused."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise UserError(f"cannot read config file {path}: {error.strerror}.") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        reason = " ".join(str(error).split())  # one line: YAML's own message spans several
        raise UserError(f"{path}: not valid safe YAML ({reason}). Python object tags are not allowed.") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: the top level must be a mapping of sections (data, model, loss, train, ...).")
    return raw


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """['train.epochs=5', 'model.heads=[fine]'] -> nested dict; values are parsed as YAML."""
    result: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r} must look like section.field=value, e.g. train.epochs=5.")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            raise UserError(f"override {item!r}: the value is not valid YAML.") from None
        node = result
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return result


PROFILES = Path(str(importlib.resources.files("artefact.profiles")))
"""The shipped profiles (cpu-smoke, laptop, v100s-x2, ...): package data, so that an installed
copy finds its own (a checkout's ``sweeps/`` links to them)."""


def profile_file(name: str) -> tuple[str, Path]:
    """(profile name, YAML path) for a profile name from ``PROFILES`` or a path to a YAML file."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise UserError(f"--profile {name}: no such file.")
        return path.stem, path
    path = PROFILES / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PROFILES.glob("*.yaml"))
        raise UserError(f"--profile {name!r} is unknown; profiles: {', '.join(known)} (or a path to a YAML file).")
    return name, path


@dataclass(frozen=True)
class SweepFlags:
    """The main job's flags that set config fields; None (or empty): not given, the profile's
    value stays. ``--set`` overrides are applied after them."""

    mode: str | None = None
    encoders: str | None = None
    """Comma-separated, as typed."""
    trials: int | None = None
    seeds: int | None = None
    epochs: int | None = None
    data: str | None = None
    objectives: str | None = None
    """Comma-separated; also turns ASHA off, which cannot weigh several objectives."""
    cv: str | None = None

    def sections(self) -> dict[str, dict[str, Any]]:
        sections: dict[str, dict[str, Any]] = {"sweep": {}, "train": {}, "data": {}}
        if self.mode:
            sections["sweep"]["mode"] = self.mode
        if self.encoders is not None:
            sections["sweep"]["encoders"] = [e.strip() for e in self.encoders.split(",") if e.strip()]
        if self.trials is not None:
            sections["sweep"]["trials"] = self.trials
        if self.seeds is not None:
            sections["sweep"]["seeds"] = self.seeds
        if self.epochs is not None:
            sections["train"]["epochs"] = self.epochs
        if self.data:
            sections["data"]["path"] = str(Path(self.data).resolve())
        if self.objectives is not None:
            sections["sweep"]["objectives"] = [o.strip() for o in self.objectives.split(",") if o.strip()]
            sections["sweep"]["scheduler"] = "none"
        if self.cv is not None:
            sections["data"]["cv"] = self.cv
        return sections


def load_config(
    path: Path | None = None,
    overrides: list[str] | None = None,
    flags: SweepFlags | None = None,
    log=None,
    results: Path | None = None,
    resumed: Path | None = None,
) -> Config:
    """A profile (or the defaults) with the main job's flags, then ``--set`` overrides, applied;
    ``resources.gpus_per_worker: auto`` resolved to a number (and the choice given to ``log``):
    the one in ``resumed`` (the saved config.yaml of a sweep being resumed, which must go on
    as it started), else by the GPU busy share the last sweep of the same shape in
    ``results`` measured, if any."""
    raw = read_yaml(path) if path is not None else {}
    where = str(path) if path else "config"
    if flags is not None:
        raw = deep_merge(raw, flags.sections())
        where = f"{where} with command-line flags"
    raw = deep_merge(raw, parse_overrides(overrides or []))
    cfg = from_dict(raw, where)
    if cfg.resources.gpus_per_worker != "auto":
        return cfg
    say = log or (lambda line: None)
    saved = read_yaml(resumed).get("resources") if resumed else None
    started_with = saved.get("gpus_per_worker") if isinstance(saved, dict) else None
    if isinstance(started_with, int | float) and not isinstance(started_with, bool):
        say(f"resources.gpus_per_worker = auto: {started_with:g}, as the sweep chose when it started ({resumed})")
        return cfg.replace(resources={"gpus_per_worker": float(started_with)})
    from artefact.gpu_busy import latest_busy
    from artefact.gpu_memory import resolve_gpu_packing  # builds models on the meta device

    measured = latest_busy(results, cfg, say) if results is not None else None
    cfg, choice = resolve_gpu_packing(cfg, measured)
    if choice:
        say(choice)
    return cfg


def dump_yaml(config: Config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


CHECKOUT = Path(__file__).resolve().parents[1]


def project_folder() -> Path:
    """Where results/, data/ and mlflow/ go unless told otherwise: the checkout this code runs
    from, else (an installed package) the current folder, as MLflow's own defaults do."""
    return CHECKOUT if (CHECKOUT / "sweeps" / "encoder_bench.py").is_file() else Path.cwd()


def default_tracking_uri() -> str:
    """MLflow's own ``MLFLOW_TRACKING_URI`` when set, else the SQLite store in the project's mlflow/."""
    return absolute_sqlite(
        os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_folder() / 'mlflow' / 'mlflow.db'}"
    )


def absolute_sqlite(uri: str) -> str:
    """Ray runs trials in other folders, so a relative SQLite path is made absolute here."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
    return uri
