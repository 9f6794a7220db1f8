"""A deterministic train/validation split by source image, stratified by material.

Groups (source images) are never separated, so offline augmented copies of one image
cannot land on both sides (POC-5.8's leak). Order comes from a seeded hash of the
group name, so the split does not depend on the order a source lists its rows.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from artefact.errors import UserError


@dataclass(frozen=True)
class GroupInfo:
    group: str
    material: str
    content: str


def _rank(seed: int, group: str) -> str:
    return hashlib.sha256(f"{seed}:{group}".encode()).hexdigest()


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
        # Several rows (samples) may share one group: count each group once, under one material
        # chosen independently of row order.
        material_of: dict[str, str] = {}
        for g in groups:
            material_of[g.group] = min(material_of.get(g.group, g.material), g.material)
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
