"""A deterministic train/validation split by source image, stratified by material, and the
cross-validation folds (``data.cv``).

Groups (source images) are never separated, so offline augmented copies of one image
cannot land on both sides (POC-5.8's leak). Order comes from a seeded hash of the
group name, so the split does not depend on the order a source lists its rows.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from artefact.config import CV_KINDS
from artefact.errors import UserError


@dataclass(frozen=True)
class GroupInfo:
    group: str
    material: str
    content: str


def _rank(seed: int, group: str) -> str:
    return hashlib.sha256(f"{seed}:{group}".encode()).hexdigest()


def _group_value(groups: Sequence[GroupInfo], field: str) -> dict[str, str]:
    """group -> one value of ``field`` for all its rows, chosen independently of row order."""
    value_of: dict[str, str] = {}
    for g in groups:
        value_of[g.group] = min(value_of.get(g.group, getattr(g, field)), getattr(g, field))
    return value_of


def assign_folds(groups: Sequence[GroupInfo], cv: str, seed: int) -> tuple[dict[str, int], list[str]]:
    """group -> the fold that validates it, and each fold's name: the held-out content type or
    material (leave-one-out kinds), or ``group k`` (``kfold:K``: each material's groups dealt
    round the folds in seeded order, so every fold gets its share of every material)."""
    kind = CV_KINDS.fullmatch(cv)
    if kind is None or int(kind[2] or 2) < 2:
        raise UserError(f"data.cv = {cv!r} is invalid: expected content, material or kfold:K with K >= 2.")
    if kind.group(1):
        value_of = _group_value(groups, kind.group(1))
        names = sorted(set(value_of.values()))
        if len(names) < 2:
            raise UserError(
                f"data.cv = {cv!r} holds each {kind.group(1)} out in turn, but this data has only one"
                f" ({', '.join(map(repr, names))}): use data.cv=kfold:K, or drop data.cv."
            )
        return {group: names.index(value) for group, value in value_of.items()}, names
    folds = int(kind.group(2))
    material_of = _group_value(groups, "material")
    if folds > len(material_of):
        raise UserError(
            f"data.cv = {cv!r} asks for {folds} folds, but the data has only {len(material_of)} source images; lower K."
        )
    by_material: dict[str, list[str]] = defaultdict(list)
    for group, material in material_of.items():
        by_material[material].append(group)
    assignment: dict[str, int] = {}
    for material in sorted(by_material):
        for name in sorted(by_material[material], key=lambda group: _rank(seed, group)):
            assignment[name] = len(assignment) % folds
    return assignment, [f"group {k}" for k in range(folds)]


def assign_splits(
    groups: Sequence[GroupInfo], val_fraction: float, seed: int, holdout: str | None = None
) -> dict[str, str]:
    """group -> 'train' | 'val'. ``holdout='material=Paper'`` makes that group the val side."""
    if not groups:
        raise UserError("the data set is empty: the source yielded no samples.")
    if holdout is not None:
        field, _, value = holdout.partition("=")
        splits = {}
        for g in groups:  # a group with any held-out row goes to val as a whole
            if getattr(g, field) == value:
                splits[g.group] = "val"
            else:
                splits.setdefault(g.group, "train")
        if "val" not in splits.values():
            known = sorted({getattr(g, field) for g in groups})
            raise UserError(f"data.holdout = {holdout!r} matches no sample; {field} values here: {known}.")
    else:
        # Several rows (samples) may share one group: count each group once, under one material.
        material_of = _group_value(groups, "material")
        by_material: dict[str, list[str]] = defaultdict(list)
        for group, material in material_of.items():
            by_material[material].append(group)
        splits = {}
        for members in by_material.values():
            members.sort(key=lambda name: _rank(seed, name))
            n_val = round(len(members) * val_fraction)
            if len(members) >= 2:
                n_val = min(max(n_val, 1), len(members) - 1)
            for position, name in enumerate(members):
                splits[name] = "val" if position < n_val else "train"
    for side in ("train", "val"):
        if side not in splits.values():
            raise UserError(
                f"the split leaves the {side} side empty ({len(groups)} source images, val_fraction="
                f"{val_fraction}, holdout={holdout!r}); add data or change data.val_fraction / data.holdout."
            )
    return splits
