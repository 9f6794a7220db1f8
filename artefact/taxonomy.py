"""The ARTeFACT classes and the project's class hierarchy.

This is the only place class ids, names, colours and the binary/coarse groupings live.
The coarse grouping is this project's own decision (the paper defines none), so change
it here and nowhere else.
"""

from __future__ import annotations

import numpy as np

IGNORE_INDEX = 255
"""Background: pixels outside the artwork. Never trained on, never scored."""

FINE_CLASSES: tuple[tuple[int, str, str], ...] = (
    (0, "Clean", "#000000"),
    (1, "Material loss", "#1CE6FF"),
    (2, "Peel", "#FF34FF"),
    (3, "Dust", "#FF4A46"),
    (4, "Scratch", "#008941"),
    (5, "Hair", "#006FA6"),
    (6, "Dirt", "#A30059"),
    (7, "Fold", "#FFA500"),
    (8, "Writing", "#7A4900"),
    (9, "Cracks", "#0000A6"),
    (10, "Staining", "#63FFAC"),
    (11, "Stamp", "#004D43"),
    (12, "Sticker", "#8FB0FF"),
    (13, "Puncture", "#997D87"),
    (14, "Burn marks", "#809693"),
    (15, "Lightleak", "#F6FF1B"),
)
BACKGROUND_COLOUR = "#5A0007"

FINE_NAMES: tuple[str, ...] = tuple(name for _, name, _ in FINE_CLASSES)
NUM_FINE = len(FINE_CLASSES)

BINARY_NAMES: tuple[str, ...] = ("Clean", "Damage")

COARSE_GROUPS: dict[str, tuple[int, ...]] = {
    "Structural": (1, 2, 4, 7, 9, 13),
    "Deposits": (3, 5, 6),
    "Chromatic": (10, 14, 15),
    "Additions": (8, 11, 12),
}
COARSE_NAMES: tuple[str, ...] = tuple(COARSE_GROUPS)

HEAD_CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "binary": BINARY_NAMES,
    "coarse": COARSE_NAMES,
    "fine": FINE_NAMES,
}
HEADS: tuple[str, ...] = tuple(HEAD_CLASS_NAMES)
VALID_MASK_VALUES = frozenset(range(NUM_FINE)) | {IGNORE_INDEX}


def _lookup_table(mapping: dict[int, int]) -> np.ndarray:
    table = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for fine_id, target in mapping.items():
        table[fine_id] = target
    return table


BINARY_LUT = _lookup_table({i: int(i > 0) for i in range(NUM_FINE)})
"""Fine id -> binary id; Background stays ignored."""

COARSE_LUT = _lookup_table({fine_id: group for group, ids in enumerate(COARSE_GROUPS.values()) for fine_id in ids})
"""Fine id -> coarse group; Clean and Background are ignored on the coarse head."""

FINE_LUT = _lookup_table({i: i for i in range(NUM_FINE)})
"""Identity on valid ids; any other value becomes ignore (never clamped to a class)."""

HEAD_LUTS: dict[str, np.ndarray] = {"binary": BINARY_LUT, "coarse": COARSE_LUT, "fine": FINE_LUT}


def hex_to_rgb(colour: str) -> tuple[int, int, int]:
    """'#RRGGBB' -> (r, g, b)."""
    value = colour.lstrip("#")
    return int(value[0:2], 16), int(value[2:4], 16), int(value[4:6], 16)


def palette() -> np.ndarray:
    """A 256x3 uint8 colour table indexed by fine id, with Background at 255."""
    table = np.zeros((256, 3), dtype=np.uint8)
    for class_id, _, colour in FINE_CLASSES:
        table[class_id] = hex_to_rgb(colour)
    table[IGNORE_INDEX] = hex_to_rgb(BACKGROUND_COLOUR)
    return table


def class_table(heads: tuple[str, ...]) -> dict[str, object]:
    """The classes of a model's heads, logged beside it so that its outputs can be read
    without this code: id, name and fine ids of each class, and the official colours."""
    table: dict[str, object] = {"ignore_index": IGNORE_INDEX, "background_colour": BACKGROUND_COLOUR}
    for head in heads:
        lut = HEAD_LUTS[head][:NUM_FINE]
        table[head] = [
            {"id": class_id, "name": name, "fine_ids": np.flatnonzero(lut == class_id).tolist()}
            for class_id, name in enumerate(HEAD_CLASS_NAMES[head])
        ]
    if "fine" in heads:
        for row, (_, _, colour) in zip(table["fine"], FINE_CLASSES, strict=True):
            row["colour"] = colour
    return table


def head_targets(mask: np.ndarray, heads: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Map a fine index mask to the target mask of each requested head."""
    return {head: HEAD_LUTS[head][mask] for head in heads}
