"""The PNG figures logged to MLflow: per trial (confusion matrices, prediction overlays)
and per sweep (speed/quality scatter, per-class IoU heatmap, validation curves, Optuna).

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot state, no
display needed) at a fixed size, so a PNG's pixel size is known: width x height = size
in inches x ``DPI``.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib import rc_context
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from artefact.report.pareto import pareto_front
from artefact.taxonomy import BACKGROUND_COLOUR, FINE_CLASSES, FINE_NAMES, HEAD_CLASS_NAMES, IGNORE_INDEX, palette

DPI = 100
CONFUSION_SIZE = (10.0, 9.0)
PREDICTION_SIZE = (15.0, 5.5)
SCATTER_SIZE = (8.0, 6.0)
HEATMAP_SIZE = (14.0, 6.0)
CURVES_SIZE = (8.0, 6.0)


@dataclass
class Prediction:
    """One validation image with its truth and predicted fine masks (HxW, fine ids)."""

    sample_id: str
    image: np.ndarray
    truth: np.ndarray
    predicted: np.ndarray


@dataclass
class Evaluation:
    """The best epoch so far: confusion counts per head (summed over ranks) and a few predictions."""

    epoch: int
    confusion: dict[str, np.ndarray]
    predictions: list[Prediction]


def evaluation_figures(evaluation: Evaluation, folder: Path) -> list[Path]:
    """confusion_<head>.png per head and prediction_<n>_<id>.png per image, in ``folder``."""
    paths = []
    for head, counts in evaluation.confusion.items():
        title = f"{head} head, epoch {evaluation.epoch}"
        paths.append(confusion_figure(counts, HEAD_CLASS_NAMES[head], title, folder / f"confusion_{head}.png"))
    for number, prediction in enumerate(evaluation.predictions, start=1):
        name = f"prediction_{number}_{safe_name(prediction.sample_id)}.png"
        paths.append(prediction_figure(prediction, folder / name))
    return paths


def _new_figure(size: tuple[float, float]) -> Figure:
    figure = Figure(figsize=size, dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Laid out already (``tight_layout`` or fixed margins): with the placeholder engine that
    # ``tight_layout`` leaves, savefig would draw the figure once more before drawing it for
    # the file. PNG compression level 1 rather than 6: files 12% larger, written faster.
    # Together they take a trial's drawing from 0.90 to 0.74 s (docs/performance.md).
    with rc_context({"figure.autolayout": False, "figure.constrained_layout.use": False}):
        figure.set_layout_engine(None)  # whatever the user's matplotlibrc asks for
    figure.savefig(path, dpi=DPI, format="png", pil_kwargs={"compress_level": 1})
    return path


def safe_name(text: str) -> str:
    """A file-name-safe form of an id or class name."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "item"


def confusion_figure(counts: np.ndarray, class_names: tuple[str, ...], title: str, path: Path) -> Path:
    """Row-normalised confusion matrix (each row: where that class's pixels went)."""
    counts = np.asarray(counts, dtype=np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    figure = _new_figure(CONFUSION_SIZE)
    axes = figure.add_subplot()
    image = axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    ticks = range(len(class_names))
    axes.set_xticks(ticks, class_names, rotation=60, ha="right", fontsize=8)
    axes.set_yticks(ticks, [f"{name} ({int(total)})" for name, total in zip(class_names, totals[:, 0], strict=True)])
    axes.tick_params(axis="y", labelsize=8)
    axes.set_xlabel("predicted")
    axes.set_ylabel("truth (labelled pixels)")
    axes.set_title(title)
    for row, col in zip(*np.nonzero(shares >= 0.01), strict=True):
        colour = "white" if shares[row, col] > 0.6 else "black"
        axes.text(col, row, f"{shares[row, col]:.2f}", ha="center", va="center", fontsize=6, color=colour)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="share of the row")
    figure.tight_layout()
    return _save(figure, path)


def prediction_figure(prediction: Prediction, path: Path) -> Path:
    """Image, truth and prediction side by side in the official ARTeFACT colours."""
    colours = palette()
    # Pixels outside the artwork are never scored: show them as background in both masks.
    predicted = np.where(prediction.truth == IGNORE_INDEX, IGNORE_INDEX, prediction.predicted).astype(np.uint8)
    figure = _new_figure(PREDICTION_SIZE)
    panels = (("image", prediction.image), ("truth", colours[prediction.truth]), ("prediction", colours[predicted]))
    for index, (title, pixels) in enumerate(panels, start=1):
        axes = figure.add_subplot(1, 3, index)
        axes.imshow(pixels, interpolation="nearest")
        axes.set_title(title)
        axes.set_axis_off()
    handles = [Patch(facecolor=colour, edgecolor="grey", label=name) for _, name, colour in FINE_CLASSES]
    handles.append(Patch(facecolor=BACKGROUND_COLOUR, edgecolor="grey", label="Background (not scored)"))
    figure.legend(handles=handles, loc="lower center", ncol=9, fontsize=8, frameon=False)
    figure.suptitle(f"validation image {prediction.sample_id}")
    figure.subplots_adjust(left=0.01, right=0.99, top=0.88, bottom=0.16, wspace=0.03)
    return _save(figure, path)


def speed_quality_scatter(points: list[tuple[str, float, float]], path: Path, front: bool = False) -> Path:
    """Fine mIoU against training img/s, one point per trial, coloured by encoder; with
    ``front`` (trials scored on one split), the trials no other is both faster and better
    than are joined as the Pareto front."""
    figure = _new_figure(SCATTER_SIZE)
    axes = figure.add_subplot()
    on_front = pareto_front([(speed, score) for _, speed, score in points], ("max", "max"))
    front_points = sorted((speed, score) for (_, speed, score), kept in zip(points, on_front, strict=True) if kept)
    if front and len(front_points) > 1:
        axes.plot(*zip(*front_points, strict=True), color="grey", linestyle="--", zorder=0, label="Pareto front")
    encoders = sorted({encoder for encoder, _, _ in points})
    colours = _encoder_colours(encoders)
    for encoder in encoders:
        speeds = [speed for name, speed, _ in points if name == encoder]
        scores = [score for name, _, score in points if name == encoder]
        axes.scatter(speeds, scores, label=encoder, color=colours[encoder], s=48, alpha=0.85, edgecolors="black")
    axes.set_xlabel("training throughput (img/s)")
    axes.set_ylabel("best val/miou_fine")
    axes.set_title("quality against speed, one point per trial")
    axes.grid(alpha=0.3)
    if encoders:
        axes.legend(fontsize=8)
    figure.tight_layout()
    return _save(figure, path)


def iou_heatmap(
    rows: dict[str, dict[str, float]],
    path: Path,
    columns: list[str] | tuple[str, ...] = FINE_NAMES,
    title: str = "validation IoU per class (best trial per encoder)",
    label: str = "IoU",
    top: float | None = 1.0,
) -> Path:
    """One row per encoder, one column per fine class (or held-out fold); blank: never seen.
    ``top``: the colour scale's top; None, the highest value (for differences between small values)."""
    encoders = list(rows)
    values = np.array([[rows[e].get(name, math.nan) for name in columns] for e in encoders]).reshape(
        len(encoders), len(columns)
    )
    figure = _new_figure(HEATMAP_SIZE)
    axes = figure.add_subplot()
    top = top if top is not None else float(np.nanmax(values, initial=0.0)) or 1.0
    image = axes.imshow(np.ma.masked_invalid(values), cmap="viridis", vmin=0.0, vmax=top, aspect="auto")
    axes.set_xticks(range(len(columns)), columns, rotation=45, ha="right", fontsize=9)
    axes.set_yticks(range(len(encoders)), encoders, fontsize=9)
    for row, col in zip(*np.nonzero(~np.isnan(values)), strict=True):
        colour = "black" if values[row, col] > 0.6 * top else "white"
        axes.text(col, row, f"{values[row, col]:.2f}", ha="center", va="center", fontsize=7, color=colour)
    axes.set_title(title)
    figure.colorbar(image, ax=axes, fraction=0.03, pad=0.02, label=label)
    figure.tight_layout()
    return _save(figure, path)


def validation_curves(curves: dict[str, list[tuple[int, float]]], metric: str, path: Path) -> Path:
    """``metric`` per epoch for one trial per encoder, overlaid."""
    figure = _new_figure(CURVES_SIZE)
    axes = figure.add_subplot()
    colours = _encoder_colours(sorted(curves))
    for encoder, points in curves.items():
        epochs = [epoch for epoch, _ in points]
        axes.plot(epochs, [value for _, value in points], marker="o", label=encoder, color=colours[encoder])
    axes.set_xlabel("epoch")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel(metric)
    axes.set_title(f"{metric}, best trial per encoder")
    axes.grid(alpha=0.3)
    if curves:
        axes.legend(fontsize=8)
    figure.tight_layout()
    return _save(figure, path)


def _encoder_colours(encoders: list[str]) -> dict[str, tuple]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(encoders) <= 10 else "tab20"]
    return {encoder: cmap(index % cmap.N) for index, encoder in enumerate(encoders)}


def optuna_figures(storage: str, study_name: str, folder: Path) -> tuple[list[Path], list[str]]:
    """Optuna's parameter importances and optimisation history; (PNG paths, reasons for any skipped).

    Importances need at least two finished trials whose parameters differ, so a tiny or
    failed search skips that figure with its reason instead of failing the sweep.
    """
    import matplotlib
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as optuna_plots

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=study_name, storage=storage)
    finished = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(finished) < 2:
        return [], [f"Optuna figures: {len(finished)} finished trial(s), at least 2 are needed"]
    paths, skipped = [], []
    for name, draw in (
        ("optuna_history.png", optuna_plots.plot_optimization_history),
        ("optuna_importances.png", optuna_plots.plot_param_importances),
    ):
        # Optuna switches pyplot to its own style; rc_context undoes that for later figures.
        with warnings.catch_warnings(), matplotlib.rc_context():
            warnings.simplefilter("ignore")  # "experimental" and empty-legend notices
            try:
                axes = draw(study)
            except (ValueError, RuntimeError, ZeroDivisionError) as error:
                skipped.append(f"{name}: {error}")
                continue
            figure = axes.get_figure()
            figure.set_size_inches(*CURVES_SIZE)
            figure.tight_layout()
            paths.append(_save(figure, folder / name))
            plt.close(figure)
    return paths, skipped
