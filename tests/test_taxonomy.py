"""The class list, the binary/coarse/fine mappings and the palette, checked against FACTS.md."""

from __future__ import annotations

import numpy as np
import pytest

from artefact import taxonomy as tx

# The official list from the dataset card (FACTS.md), typed out independently of the code.
OFFICIAL = [
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
]
COARSE_BY_NAME = {
    "Structural": {"Material loss", "Peel", "Scratch", "Fold", "Cracks", "Puncture"},
    "Deposits": {"Dust", "Hair", "Dirt"},
    "Chromatic": {"Staining", "Burn marks", "Lightleak"},
    "Additions": {"Writing", "Stamp", "Sticker"},
}
ALL_VALUES = np.arange(256, dtype=np.uint8)


def test_class_list_matches_the_dataset_card() -> None:
    assert [(i, name) for i, name, _ in tx.FINE_CLASSES] == [(i, name) for i, name, _ in OFFICIAL]
    assert tx.NUM_FINE == 16
    assert tx.IGNORE_INDEX == 255
    assert tx.VALID_MASK_VALUES == set(range(16)) | {255}
    assert tx.HEADS == ("binary", "coarse", "fine")
    assert [len(tx.HEAD_CLASS_NAMES[h]) for h in tx.HEADS] == [2, 4, 16]


def test_binary_mapping() -> None:
    binary = tx.head_targets(ALL_VALUES, ("binary",))["binary"]
    assert binary[0] == 0
    assert (binary[1:16] == 1).all()
    assert binary[255] == 255
    assert (binary[16:255] == 255).all(), "values outside the class list must be ignored, not damage"


def test_coarse_mapping_groups_by_name_and_ignores_clean_and_background() -> None:
    coarse = tx.head_targets(ALL_VALUES, ("coarse",))["coarse"]
    assert coarse[0] == 255, "Clean is ignored on the coarse head"
    assert coarse[255] == 255
    assert (coarse[16:255] == 255).all()
    assert tx.COARSE_NAMES == tuple(COARSE_BY_NAME)
    for index, (group, names) in enumerate(COARSE_BY_NAME.items()):
        members = {tx.FINE_NAMES[i] for i in range(16) if coarse[i] == index}
        assert members == names, group
    # Every damage class belongs to exactly one group.
    assert sorted(int(v) for v in coarse[1:16]) == sorted(
        index for index, names in enumerate(COARSE_BY_NAME.values()) for _ in names
    )


def test_fine_mapping_never_clamps() -> None:
    mask = np.array([[0, 7, 15], [16, 100, 254], [255, 255, 3]], dtype=np.uint8)
    fine = tx.head_targets(mask, ("fine",))["fine"]
    assert fine.tolist() == [[0, 7, 15], [255, 255, 255], [255, 255, 3]]
    # POC-5.8's clamp(0, 15) would have turned Background into Lightleak.
    assert not (fine[mask == 255] == 15).any()
    full = tx.head_targets(ALL_VALUES, ("fine",))["fine"]
    assert full[:16].tolist() == list(range(16))
    assert (full[16:] == 255).all()


def test_head_targets_keep_shape_and_heads() -> None:
    mask = np.random.default_rng(0).choice(np.array([0, 1, 3, 8, 10, 255], np.uint8), size=(5, 7))
    targets = tx.head_targets(mask, ("binary", "fine"))
    assert set(targets) == {"binary", "fine"}
    assert all(t.shape == mask.shape and t.dtype == np.uint8 for t in targets.values())


@pytest.mark.parametrize(("class_id", "name", "colour"), OFFICIAL)
def test_palette_entry(class_id: int, name: str, colour: str) -> None:
    table = tx.palette()
    rgb = tuple(int(colour[i : i + 2], 16) for i in (1, 3, 5))
    assert tuple(int(v) for v in table[class_id]) == rgb, name


def test_palette_shape_and_background() -> None:
    table = tx.palette()
    assert table.shape == (256, 3) and table.dtype == np.uint8
    assert tuple(int(v) for v in table[255]) == (0x5A, 0x00, 0x07)
    assert tx.hex_to_rgb("#1CE6FF") == (0x1C, 0xE6, 0xFF)
    # Colouring a mask is a plain lookup.
    assert table[np.array([[1, 255]], np.uint8)].shape == (1, 2, 3)
