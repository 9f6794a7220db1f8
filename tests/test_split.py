"""The split: deterministic, by group, stratified by material, holdout; augmented copies train-only."""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from builders import random_rows, write_folder

from artefact.data.cache import PrepareParams, read_index
from artefact.data.prepare import prepare
from artefact.data.split import GroupInfo, assign_splits
from artefact.errors import UserError

MATERIALS = ("Paper", "Parchment", "Glass", "Wood", "Ceramic")


def _groups(count: int = 60) -> list[GroupInfo]:
    # Uneven material sizes, including one material with a single group.
    sizes = {"Paper": 25, "Parchment": 15, "Glass": 10, "Wood": 9, "Ceramic": 1}
    groups = []
    for material, size in sizes.items():
        for index in range(size):
            content = ("Line art", "Artistic depiction")[index % 2]
            groups.append(GroupInfo(f"{material.lower()}-{index:02d}", material, content))
    return groups[:count]


def test_same_seed_same_split_whatever_the_input_order() -> None:
    groups = _groups()
    reference = assign_splits(groups, 0.2, seed=7)
    for shuffle_seed in range(5):
        shuffled = groups[:]
        random.Random(shuffle_seed).shuffle(shuffled)
        assert assign_splits(shuffled, 0.2, seed=7) == reference
    assert assign_splits(groups, 0.2, seed=8) != reference, "the seed must matter"


def test_stratified_by_material() -> None:
    groups = _groups()
    splits = assign_splits(groups, 0.2, seed=0)
    by_material: dict[str, Counter] = defaultdict(Counter)
    for g in groups:
        by_material[g.material][splits[g.group]] += 1
    for material, counts in by_material.items():
        total = sum(counts.values())
        if total >= 2:
            assert counts["train"] >= 1 and counts["val"] >= 1, material
            assert counts["val"] == max(1, round(total * 0.2)), material
    assert by_material["Ceramic"] == Counter(train=1), "a lone group trains"


def test_tiny_materials_still_get_both_sides() -> None:
    groups = [GroupInfo(f"g{i}", "Glass", "x") for i in range(2)]
    assert sorted(assign_splits(groups, 0.05, seed=0).values()) == ["train", "val"]
    assert sorted(assign_splits(groups, 0.95, seed=0).values()) == ["train", "val"]


@pytest.mark.parametrize("seed", range(12))
def test_rows_sharing_a_group_count_once(seed: int) -> None:
    """Several samples of one source image: the group stays whole and the split still has two sides.

    (Counting a group once per row made the val side come out empty for some seeds.)
    """
    rows = [GroupInfo("scan-A", "Paper", "x")] * 3 + [GroupInfo("scan-B", "Paper", "x")]
    splits = assign_splits(rows, 0.2, seed=seed)
    assert sorted(splits) == ["scan-A", "scan-B"]
    assert sorted(splits.values()) == ["train", "val"]


def test_holdout_material_is_exactly_the_val_side() -> None:
    groups = _groups()
    splits = assign_splits(groups, 0.2, seed=0, holdout="material=Glass")
    val = {g.group for g in groups if splits[g.group] == "val"}
    assert val == {g.group for g in groups if g.material == "Glass"}
    content = assign_splits(groups, 0.2, seed=0, holdout="content=Line art")
    assert {g for g, side in content.items() if side == "val"} == {g.group for g in groups if g.content == "Line art"}


def test_holdout_keeps_a_mixed_group_whole_on_val() -> None:
    rows = [GroupInfo("a", "Glass", "x"), GroupInfo("a", "Paper", "x"), GroupInfo("b", "Paper", "x")]
    for order in (rows, rows[::-1]):
        assert assign_splits(order, 0.2, seed=0, holdout="material=Glass") == {"a": "val", "b": "train"}


def test_split_errors() -> None:
    with pytest.raises(UserError, match="empty"):
        assign_splits([], 0.2, seed=0)
    with pytest.raises(UserError, match=r"matches no sample.*\['Glass', 'Paper'\]"):
        assign_splits([GroupInfo("a", "Paper", "x"), GroupInfo("b", "Glass", "x")], 0.2, 0, "material=Wood")
    with pytest.raises(UserError, match="train side empty"):
        assign_splits([GroupInfo("a", "Paper", "x"), GroupInfo("b", "Paper", "x")], 0.2, 0, "material=Paper")
    with pytest.raises(UserError, match="val side empty"):
        assign_splits([GroupInfo("a", "Paper", "x")], 0.2, seed=0)


def test_prepared_cache_augments_only_the_training_side(tmp_path: Path) -> None:
    rows = random_rows(12, materials=MATERIALS[:3])
    rows[0].group = rows[3].group = "shared"  # two samples of one source image, same material
    write_folder(tmp_path / "src", rows, columns=("id", "material", "content", "group"))
    cache = prepare(tmp_path / "src", tmp_path / "cache", PrepareParams(augment_copies=3), log=lambda *_: None)
    index = read_index(cache)
    by_id = {r["id"]: r for r in index}
    originals = [r for r in index if r["id"] in {row.id for row in rows}]
    assert len(originals) == 12

    sides_per_group: dict[str, set] = defaultdict(set)
    for row in index:
        sides_per_group[row["group"]].add(row["split"])
    assert all(len(sides) == 1 for sides in sides_per_group.values()), "a group on both sides leaks"
    assert by_id[rows[0].id]["split"] == by_id[rows[3].id]["split"]

    for row in originals:
        copies = [f"{row['id']}.{name}" for name in ("hflip", "vflip", "rot90")]
        if row["split"] == "train":
            assert all(c in by_id and by_id[c]["split"] == "train" for c in copies)
            assert all(by_id[c]["group"] == row["group"] for c in copies)
        else:
            assert not any(c in by_id for c in copies), "augmented copies must never be validated on"
            assert not any((cache / "images" / f"{c}.npy").exists() for c in copies)
    train_originals = sum(r["split"] == "train" for r in originals)
    assert len(index) == 12 + 3 * train_originals

    some = next(r["id"] for r in originals if r["split"] == "train")
    image = np.load(cache / "images" / f"{some}.npy")
    mask = np.load(cache / "masks" / f"{some}.npy")
    assert np.array_equal(np.load(cache / "images" / f"{some}.hflip.npy"), image[:, ::-1])
    assert np.array_equal(np.load(cache / "masks" / f"{some}.vflip.npy"), mask[::-1])
    assert np.array_equal(np.load(cache / "masks" / f"{some}.rot90.npy"), np.rot90(mask))
    assert by_id[f"{some}.rot90"]["height"] == mask.shape[1]


def test_prepared_split_does_not_depend_on_row_order(tmp_path: Path) -> None:
    rows = random_rows(15, materials=MATERIALS)
    write_folder(tmp_path / "a", rows)
    write_folder(tmp_path / "b", rows[::-1])
    params = PrepareParams(split_seed=3)
    first = {r["id"]: r["split"] for r in read_index(prepare(tmp_path / "a", tmp_path / "ca", params, log=print))}
    second = {r["id"]: r["split"] for r in read_index(prepare(tmp_path / "b", tmp_path / "cb", params, log=print))}
    assert first == second
    assert set(first.values()) == {"train", "val"}
