"""Accuracy against cost in a multi-objective search (``sweep.objectives``): the trials no other
trial beats on every objective at once, their Pareto front, read at each trial's best epoch."""

from __future__ import annotations

import csv
from pathlib import Path

from artefact.config import OBJECTIVES
from artefact.report.trials import TrialSummary

PARETO_FILE = "pareto.csv"


def pareto_front(points: list[tuple[float, ...]], directions: tuple[str, ...]) -> list[bool]:
    """For each point, whether no other point is at least as good on every objective and
    better on one (``directions``: ``max`` or ``min`` per objective)."""
    signs = [1.0 if direction == "max" else -1.0 for direction in directions]
    scored = [tuple(sign * value for sign, value in zip(signs, point, strict=True)) for point in points]

    def beaten(point: tuple[float, ...]) -> bool:
        return any(all(o >= p for o, p in zip(other, point, strict=True)) and other != point for other in scored)

    return [not beaten(point) for point in scored]


def front_rows(summaries: list[TrialSummary], objectives: tuple[str, ...]) -> list[dict[str, object]]:
    """One row per scored trial with its objectives' values, the front first, each part by the
    first objective, best first."""
    keys = [OBJECTIVES[name][0] for name in objectives]
    scored = [s for s in summaries if s.outcome != "failed" and all(key in s.best for key in keys)]
    values = [tuple(s.best[key] for key in keys) for s in scored]
    on_front = pareto_front(values, tuple(OBJECTIVES[name][1] for name in objectives))
    first_sign = 1.0 if OBJECTIVES[objectives[0]][1] == "max" else -1.0
    rows = [
        {
            "trial_id": s.trial_id,
            "encoder": s.params.get("encoder"),
            **dict(zip(objectives, v, strict=True)),
            "front": f,
        }
        for s, v, f in zip(scored, values, on_front, strict=True)
    ]
    return sorted(rows, key=lambda row: (not row["front"], -first_sign * float(row[objectives[0]])))


def write_pareto(rows: list[dict[str, object]], objectives: tuple[str, ...], out: Path) -> Path:
    path = out / PARETO_FILE
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["trial_id", "encoder", *objectives, "front"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def front_markdown(rows: list[dict[str, object]], objectives: tuple[str, ...]) -> str:
    """The leaderboard's section on the front: the trials on it, with their objectives."""
    title, *front = describe_front(rows, objectives)
    return f"## {title}\n\n" + "".join(f"- {line.strip()}\n" for line in front)


def describe_front(rows: list[dict[str, object]], objectives: tuple[str, ...]) -> list[str]:
    """What the terminal says: the objectives with their directions, then each front trial."""
    arrows = ", ".join(f"{name} {'↑' if OBJECTIVES[name][1] == 'max' else '↓'}" for name in objectives)
    front = [row for row in rows if row["front"]]
    lines = [f"Pareto front ({arrows}): {len(front)} of {len(rows)} scored trials"]
    for row in front:
        values = ", ".join(f"{name} {float(row[name]):.4g}" for name in objectives)
        lines.append(f"  {row['trial_id']}  {row['encoder']}: {values}")
    return lines
