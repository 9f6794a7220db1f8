"""The leaderboard: one row per encoder, ranked by fine mIoU, as text, CSV, Markdown and plots.

Search mode shows each encoder's best trial; fair mode shows mean and standard
deviation over the seeds, as POC-5.8's benchmark intended.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import statistics
from collections import defaultdict
from pathlib import Path

from artefact.report.comparison import Comparison
from artefact.report.figures import iou_heatmap, speed_quality_scatter, validation_curves
from artefact.report.intervals import encoder_interval
from artefact.report.trials import TrialSummary
from artefact.taxonomy import FINE_NAMES

HEAD_COLUMNS = ("val/miou_fine", "val/miou_coarse", "val/miou_binary")
MEASURED = {
    "miou_fine": "val/miou_fine",
    "miou_coarse": "val/miou_coarse",
    "miou_binary": "val/miou_binary",
    "img_per_s": "perf/img_per_s",
    "peak_mem_mb": "perf/peak_mem_mb",
    "params_m": "model/params",
    "train_min": "perf/train_s",
    "to_best_min": "perf/to_best_s",
}
"""Leaderboard columns read from each trial's best epoch (and its cost), and their metric."""
SCALE = {"params_m": 1e-6, "train_min": 1 / 60, "to_best_min": 1 / 60}
COLUMNS = (
    "encoder",
    "trials",
    "miou_fine",
    "miou_fine_ci95",
    *(c for c in MEASURED if c != "miou_fine"),
    "batch",
    "lr",
    "gpu_h",
)
"""The seeds' tables stated cost next to quality: minutes per trial, to the best epoch, and
the GPU-hours all of an encoder's trials took; ``batch`` and ``lr`` are what its trials ran at.
``miou_fine_ci95``: the 95% interval of the shown fine mIoU by bootstrap over validation images."""
COMPARISON_FIELDS = [field.name for field in dataclasses.fields(Comparison)]


def _scored_by_encoder(summaries: list[TrialSummary]) -> dict[str, list[TrialSummary]]:
    """Trials that finished with at least one validation, by encoder; failed trials never rank."""
    by_encoder: dict[str, list[TrialSummary]] = defaultdict(list)
    for summary in summaries:
        if summary.best and summary.outcome != "failed":
            by_encoder[str(summary.params.get("encoder"))].append(summary)
    return by_encoder


def leaderboard(summaries: list[TrialSummary], mode: str, uses_gpus: bool) -> list[dict[str, object]]:
    """Rows per encoder; values are floats (search) or (mean, std) pairs (fair). GPU-hours
    (``perf/gpu_hours``, None without GPUs) count every trial of the encoder, failed and
    stopped ones too: they were paid for."""
    by_encoder = _scored_by_encoder(summaries)
    rows = []
    for encoder, trials in by_encoder.items():
        row: dict[str, object] = {"encoder": encoder, "trials": len(trials)}
        if mode == "search":
            trials = [max(trials, key=lambda t: t.best.get("val/miou_fine", -math.inf))]
        for column, key in MEASURED.items():
            row[column] = _mean_std([t.best[key] * SCALE.get(column, 1.0) for t in trials if key in t.best])
        row["miou_fine_ci95"] = encoder_interval(trials)
        row["batch"] = trials[0].params.get("batch_size")
        row["lr"] = trials[0].params.get("lr")
        hours = sum(s.best.get("perf/gpu_hours", 0.0) for s in summaries if s.params.get("encoder") == encoder)
        row["gpu_h"] = hours if uses_gpus else None
        rows.append(row)
    return sorted(rows, key=lambda r: -(r["miou_fine"] or (-1.0, 0.0))[0])


def _mean_std(values: list[float]) -> tuple[float, float] | None:
    if not values:
        return None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _cell(value: object, mode: str, column: str) -> str:
    digits = _DIGITS.get(column, 0)
    if value is None:
        return "-"
    if column == "miou_fine_ci95":
        return f"[{value[0]:.{digits}f}, {value[1]:.{digits}f}]"
    if isinstance(value, tuple):
        mean, std = value
        return f"{mean:.{digits}f} ± {std:.{digits}f}" if mode == "fair" else f"{mean:.{digits}f}"
    if column == "lr":
        return f"{value:.2g}"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


_DIGITS = {
    "miou_fine": 4,
    "miou_fine_ci95": 4,
    "miou_coarse": 4,
    "miou_binary": 4,
    "img_per_s": 1,
    "peak_mem_mb": 0,
    "params_m": 2,
    "train_min": 2,
    "to_best_min": 2,
    "gpu_h": 2,
}


def format_table(rows: list[dict[str, object]], mode: str) -> list[list[str]]:
    header = ["rank", *COLUMNS]
    body = [[str(rank), *(_cell(row[c], mode, c) for c in COLUMNS)] for rank, row in enumerate(rows, 1)]
    return [header, *body]


def text_table(table: list[list[str]]) -> str:
    """A header and rows of cells as aligned columns for the terminal."""
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)) for line in table]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def markdown_table(table: list[list[str]]) -> list[str]:
    """A header and rows of cells as the lines of a Markdown table."""
    header, *body = table
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(b) + " |" for b in body)]


def render_text(rows: list[dict[str, object]], mode: str) -> str:
    return text_table(format_table(rows, mode))


def describe_config(params: dict[str, object]) -> str:
    """A trial's configuration, in the names of the settings a user would change."""
    parts = []
    for key in ("encoder", "batch_size", "lr", "seed", "fold", "loss_kind", "class_weights"):
        if key in params:
            value = params[key]
            parts.append(f"{key}={value:.2g}" if isinstance(value, float) else f"{key}={value}")
    return ", ".join(parts)


def failed_trials(summaries: list[TrialSummary]) -> list[str]:
    """One line per failed trial: which configuration failed, and why (out of memory, NaN loss, ...)."""
    return [f"{s.trial_id} ({describe_config(s.params)}): {s.reason}" for s in summaries if s.outcome == "failed"]


def render_markdown(
    rows: list[dict[str, object]], mode: str, failures: list[str], sentences: list[str], appendix: str = ""
) -> str:
    lines = markdown_table(format_table(rows, mode))
    if sentences:
        lines += ["", "Compared with the best on the same seeds (and folds):", "", *(f"- {line}" for line in sentences)]
    if failures:
        lines += ["", "Failed trials (not ranked):", "", *(f"- {line}" for line in failures)]
    return "\n".join(lines) + "\n" + (f"\n{appendix}" if appendix else "")


def write_leaderboard(
    rows: list[dict[str, object]],
    summaries: list[TrialSummary],
    mode: str,
    out: Path,
    judged: tuple[list[Comparison], list[str]] = ([], []),
    appendix: str = "",
) -> list[Path]:
    """leaderboard.csv (means and stds as separate columns), leaderboard.md (with ``appendix``,
    Markdown sections after the table) and trials.csv; with a fair sweep's comparisons
    (``comparison.verdicts``) also comparison.csv."""
    out.mkdir(parents=True, exist_ok=True)
    comparisons, sentences = judged
    board_csv = out / "leaderboard.csv"
    with board_csv.open("w", newline="", encoding="utf-8") as handle:
        plain = [c for c in COLUMNS if c not in MEASURED and c != "miou_fine_ci95"]
        fields = ["rank", *plain] + [f"{c}{s}" for c in MEASURED for s in ("", "_std")]
        writer = csv.DictWriter(handle, fieldnames=[*fields, "miou_fine_ci95_low", "miou_fine_ci95_high"])
        writer.writeheader()
        for rank, row in enumerate(rows, 1):
            record: dict[str, object] = {"rank": rank, **{c: "" if row[c] is None else row[c] for c in plain}}
            for column in MEASURED:
                value = row[column]
                record[column], record[f"{column}_std"] = value if isinstance(value, tuple) else ("", "")
            record["miou_fine_ci95_low"], record["miou_fine_ci95_high"] = row["miou_fine_ci95"] or ("", "")
            writer.writerow(record)
    board_md = out / "leaderboard.md"
    board_md.write_text(render_markdown(rows, mode, failed_trials(summaries), sentences, appendix), encoding="utf-8")
    written = [board_csv, board_md]
    if comparisons:
        written.append(out / "comparison.csv")
        with written[-1].open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=[*COMPARISON_FIELDS, "tied"])
            writer.writeheader()
            for comparison in comparisons:
                writer.writerow({**dataclasses.asdict(comparison), "tied": comparison.tied})
    trials_csv = out / "trials.csv"
    with trials_csv.open("w", newline="", encoding="utf-8") as handle:
        param_keys = sorted({k for s in summaries for k in s.params})
        metric_keys = sorted({k for s in summaries for k in s.best})
        writer = csv.writer(handle)
        writer.writerow(["trial_id", "outcome", "epochs", "reason", *param_keys, *metric_keys, "best_checkpoint"])
        for s in summaries:
            writer.writerow(
                [
                    s.trial_id,
                    s.outcome,
                    s.epochs,
                    s.reason or "",
                    *(s.params.get(k, "") for k in param_keys),
                    *(s.best.get(k, "") for k in metric_keys),
                    s.best_checkpoint or "",
                ]
            )
    return [*written, trials_csv]


def write_plots(
    rows: list[dict[str, object]],
    summaries: list[TrialSummary],
    histories: dict[str, list[dict[str, float]]],
    metric: str,
    mode: str,
    out: Path,
) -> list[Path]:
    """speed_quality.png (every trial), iou_per_class.png (encoders in leaderboard order;
    fair mode averages the seeds) and validation_curves.png (best trial per encoder)."""
    by_encoder = _scored_by_encoder(summaries)
    points = [
        (encoder, trial.best["perf/img_per_s"], trial.best["val/miou_fine"])
        for encoder, trials in by_encoder.items()
        for trial in trials
        if "perf/img_per_s" in trial.best and "val/miou_fine" in trial.best
    ]
    heat: dict[str, dict[str, float]] = {}
    curves: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        encoder = str(row["encoder"])
        trials = by_encoder[encoder]
        best = max(trials, key=lambda trial: trial.best.get(metric, -math.inf))
        chosen = trials if mode == "fair" else [best]
        heat[encoder] = {
            name: statistics.fmean(values)
            for name in FINE_NAMES
            if (values := [t.best[f"val/iou/{name}"] for t in chosen if f"val/iou/{name}" in t.best])
        }
        curves[encoder] = [
            (int(epoch["epoch"]), epoch[metric]) for epoch in histories.get(best.trial_id, []) if metric in epoch
        ]
    return [
        speed_quality_scatter(points, out / "speed_quality.png", front=mode == "search"),
        iou_heatmap(heat, out / "iou_per_class.png"),
        validation_curves(curves, metric, out / "validation_curves.png"),
    ]
