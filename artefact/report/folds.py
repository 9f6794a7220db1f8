"""A cross-validated sweep (``data.cv``) seen fold by fold, as POC-6 reported it: each
encoder's fine mIoU on each held-out group (mean over seeds), its mean ± std over every fold
and seed, its worst fold, and its per-class IoU there; with a heatmap of encoders x held-out
groups. A mean over folds can hide the medium an encoder fails on; this view shows it.
"""

from __future__ import annotations

import csv
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from artefact.report.figures import iou_heatmap
from artefact.report.leaderboard import markdown_table, text_table
from artefact.report.trials import TrialSummary
from artefact.taxonomy import FINE_NAMES

METRIC = "val/miou_fine"


@dataclass(frozen=True)
class FoldRow:
    """One encoder across the folds."""

    encoder: str
    by_fold: dict[str, float]
    """Held-out group -> fine mIoU, mean over the seeds that scored there."""
    mean: float
    std: float
    """Over every scored fold x seed trial."""
    worst: str
    worst_classes: dict[str, float]
    """Fine class -> IoU on the worst fold (mean over seeds), for classes seen there."""


def fold_rows(summaries: list[TrialSummary], names: list[str]) -> list[FoldRow]:
    """Encoders by mean fine mIoU over folds and seeds, best first; failed trials never count."""
    trials: dict[str, dict[str, list[TrialSummary]]] = defaultdict(lambda: defaultdict(list))
    for summary in summaries:
        if summary.outcome != "failed" and METRIC in summary.best and "fold" in summary.params:
            trials[str(summary.params["encoder"])][names[int(summary.params["fold"])]].append(summary)
    rows = []
    for encoder, by_fold in trials.items():
        scores = {fold: statistics.fmean(t.best[METRIC] for t in scored) for fold, scored in by_fold.items()}
        every = [t.best[METRIC] for scored in by_fold.values() for t in scored]
        worst = min(scores, key=scores.__getitem__)
        classes = {
            name: statistics.fmean(values)
            for name in FINE_NAMES
            if (values := [t.best[f"val/iou/{name}"] for t in by_fold[worst] if f"val/iou/{name}" in t.best])
        }
        spread = statistics.stdev(every) if len(every) > 1 else 0.0
        rows.append(FoldRow(encoder, scores, statistics.fmean(every), spread, worst, classes))
    return sorted(rows, key=lambda row: -row.mean)


def fold_table(rows: list[FoldRow], names: list[str]) -> list[list[str]]:
    """Header and one line per encoder: folds as columns, then mean ± std and the worst fold."""
    header = ["encoder", *names, "mean ± std", "worst fold"]
    body = [
        [
            row.encoder,
            *(f"{row.by_fold[name]:.4f}" if name in row.by_fold else "-" for name in names),
            f"{row.mean:.4f} ± {row.std:.4f}",
            row.worst,
        ]
        for row in rows
    ]
    return [header, *body]


def render_fold_text(rows: list[FoldRow], names: list[str]) -> str:
    return "fine mIoU per held-out fold (mean over seeds):\n" + text_table(fold_table(rows, names))


def fold_markdown(rows: list[FoldRow], names: list[str]) -> str:
    """The leaderboard's fold section: the per-fold table, then each encoder's classes on its worst fold."""
    classes = [["class", *(f"{row.encoder} ({row.worst})" for row in rows)]]
    classes += [
        [name, *(f"{row.worst_classes[name]:.4f}" if name in row.worst_classes else "-" for row in rows)]
        for name in FINE_NAMES
        if any(name in row.worst_classes for row in rows)
    ]
    lines = ["## Fine mIoU per held-out fold (mean over seeds)", "", *markdown_table(fold_table(rows, names))]
    lines += ["", "## IoU per class on each encoder's worst fold", "", *markdown_table(classes)]
    return "\n".join(lines) + "\n"


def write_folds(rows: list[FoldRow], names: list[str], out: Path, plots: Path, cv: str) -> list[Path]:
    """folds.csv (encoder x fold), worst_fold_classes.csv, and plots/folds.png."""
    out.mkdir(parents=True, exist_ok=True)
    folds_csv = out / "folds.csv"
    with folds_csv.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["encoder", "fold", "held_out", "miou_fine"])
        for row in rows:
            for index, name in enumerate(names):
                if name in row.by_fold:
                    writer.writerow([row.encoder, index, name, row.by_fold[name]])
    classes_csv = out / "worst_fold_classes.csv"
    with classes_csv.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["encoder", "worst_fold", "class", "iou"])
        for row in rows:
            writer.writerows([row.encoder, row.worst, name, iou] for name, iou in row.worst_classes.items())
    heatmap = iou_heatmap(
        {row.encoder: row.by_fold for row in rows},
        plots / "folds.png",
        names,
        f"fine mIoU per held-out fold ({cv}; mean over seeds)",
        "fine mIoU",
        top=None,
    )
    return [folds_csv, classes_csv, heatmap]
