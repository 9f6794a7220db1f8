"""The whole search space of a sweep: its definition (Optuna, or the fair grid), the base
points tried first, the decoding of a trial's sampled params into its config, and the
description logged to MLflow and compared on --resume.

A change to the space touches ``config.SweepConfig`` (its settings) and this module only.
Optuna is imported for type hints only: a trial process imports this module to decode its
params, and never needs Optuna.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ray import tune

from artefact.config import Config

if TYPE_CHECKING:
    import optuna

SEARCHED_LOSS_FIELDS = {"loss_kind": "kind", "class_weights": "class_weights"}
"""Trial params (``sweep.search_loss_kinds``, ``sweep.search_class_weights``) -> their ``loss.*`` field."""


def trial_count(cfg: Config, folds: int = 0) -> int:
    """The number of trials a sweep asks for, on a cache with ``folds`` folds (``data.cv``)."""
    if cfg.sweep.mode == "fair":
        return len(cfg.sweep.encoders) * cfg.sweep.seeds * max(folds, 1)
    return cfg.sweep.trials


def space_description(cfg: Config) -> dict[str, Any]:
    """The searched space, as logged to MLflow and compared on --resume."""
    sweep = cfg.sweep
    if sweep.mode == "fair":
        return {"mode": "fair", "encoders": list(sweep.encoders), "seeds": sweep.seeds}
    return {
        "mode": "search",
        "encoders": list(sweep.encoders),
        "batch_sizes": list(sweep.batch_sizes),
        "lr": [sweep.lr_min, sweep.lr_max],
        "loss_weights": _searches_weights(cfg),
        "loss_kinds": list(sweep.search_loss_kinds) or [cfg.loss.kind],
        "class_weights": list(sweep.search_class_weights) or [cfg.loss.class_weights],
    }


def _searches_weights(cfg: Config) -> bool:
    return cfg.sweep.search_loss_weights and len(cfg.model.heads) > 1


@dataclass(frozen=True)
class SearchSpace:
    """Optuna define-by-run space; a picklable object because Tune checkpoints the searcher."""

    encoders: tuple[str, ...]
    batch_sizes: tuple[int, ...]
    lr_min: float
    lr_max: float
    weight_heads: tuple[str, ...]
    loss_kinds: tuple[str, ...] = ()
    class_weights: tuple[str, ...] = ()
    """Choices for the trial params ``loss_kind`` and ``class_weights``; empty = not searched."""

    @classmethod
    def from_config(cls, cfg: Config) -> SearchSpace:
        sweep = cfg.sweep
        heads = cfg.model.heads if _searches_weights(cfg) else ()
        return cls(
            sweep.encoders,
            sweep.batch_sizes,
            sweep.lr_min,
            sweep.lr_max,
            heads,
            sweep.search_loss_kinds,
            sweep.search_class_weights,
        )

    def __call__(self, trial: optuna.Trial) -> None:
        trial.suggest_categorical("encoder", list(self.encoders))
        trial.suggest_categorical("batch_size", list(self.batch_sizes))
        trial.suggest_float("lr", self.lr_min, self.lr_max, log=True)
        for head in self.weight_heads:
            trial.suggest_float(f"w_{head}", 1e-6, 1.0)
        if self.loss_kinds:
            trial.suggest_categorical("loss_kind", list(self.loss_kinds))
        if self.class_weights:
            trial.suggest_categorical("class_weights", list(self.class_weights))


def grid(cfg: Config, folds: int = 0) -> dict[str, Any]:
    """Tune's param space: every encoder x seed (x fold, on a cache with folds) in fair mode;
    empty in search mode, where the searcher samples each trial's params."""
    if cfg.sweep.mode == "fair":
        return {
            "encoder": tune.grid_search(list(cfg.sweep.encoders)),
            "seed": tune.grid_search(list(range(cfg.sweep.seeds))),
            **({"fold": tune.grid_search(list(range(folds)))} if folds else {}),
        }
    return {}


def default_points(cfg: Config) -> list[dict[str, Any]]:
    """The base configuration (weights 0.2/0.3/0.5) on each encoder, evaluated first.

    The search is measured against these, and every listed encoder gets at least one trial.
    """
    return [_default_point(cfg, encoder) for encoder in cfg.sweep.encoders][: cfg.sweep.trials]


def _default_point(cfg: Config, encoder: str) -> dict[str, Any]:
    point: dict[str, Any] = {
        "encoder": encoder,
        "batch_size": cfg.train.batch_size
        if cfg.train.batch_size in cfg.sweep.batch_sizes
        else cfg.sweep.batch_sizes[0],
        "lr": min(max(cfg.train.lr, cfg.sweep.lr_min), cfg.sweep.lr_max),
    }
    if _searches_weights(cfg):
        weights = cfg.loss.weights(cfg.model.heads)
        point.update({f"w_{head}": math.exp(-weight) for head, weight in weights.items()})
    for name, base, choices in (
        ("loss_kind", cfg.loss.kind, cfg.sweep.search_loss_kinds),
        ("class_weights", cfg.loss.class_weights, cfg.sweep.search_class_weights),
    ):
        if choices:
            point[name] = base if base in choices else choices[0]
    return point


def apply_trial_params(base: Config, params: dict[str, Any]) -> Config:
    """The base config with one trial's sampled values filled in, at the encoder's batch size."""
    train: dict[str, Any] = {key: params[key] for key in ("batch_size", "lr", "seed") if key in params}
    train["batch_size"], train["lr"] = base.sweep.scaled_batch(
        params["encoder"], train.get("batch_size", base.train.batch_size), train.get("lr", base.train.lr)
    )
    sections: dict[str, Any] = {"model": {"encoder": params["encoder"]}, "train": train}
    if "fold" in params:
        sections["data"] = {"fold": params["fold"]}
    loss = {field: params[name] for name, field in SEARCHED_LOSS_FIELDS.items() if name in params}
    raw_weights = {head: params[f"w_{head}"] for head in base.model.heads if f"w_{head}" in params}
    if raw_weights:
        loss.update(simplex_weights(raw_weights))
    if loss:
        sections["loss"] = loss
    return base.replace(**sections)


def simplex_weights(raw: dict[str, float]) -> dict[str, float]:
    """Uniform (0, 1] draws -> weights on the simplex (a Dirichlet(1) sample via -log u)."""
    logs = {head: -math.log(max(value, 1e-12)) for head, value in raw.items()}
    total = sum(logs.values()) or 1.0
    return {head: value / total for head, value in logs.items()}


def leaderboard_params(params: dict[str, Any], cfg: Config) -> dict[str, Any]:
    """A trial's sampled params as the leaderboard shows them: loss weights on the simplex,
    and the batch size and learning rate it trained at (``encoder_max_batch``)."""
    shown = {k: v for k, v in params.items() if not k.startswith("w_")}
    raw_weights = {k.removeprefix("w_"): v for k, v in params.items() if k.startswith("w_")}
    shown.update({f"loss_weight_{h}": round(w, 4) for h, w in simplex_weights(raw_weights).items()})
    if "encoder" in shown:
        shown["batch_size"], shown["lr"] = cfg.sweep.scaled_batch(
            shown["encoder"], shown.get("batch_size", cfg.train.batch_size), shown.get("lr", cfg.train.lr)
        )
    return shown
