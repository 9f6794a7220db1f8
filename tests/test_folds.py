"""Cross-validation (``--cv``): folds built into the cache without leaks, trained as a fair
sweep's grid dimension, and reported fold by fold with intervals from the validation images."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import random_rows, run_cli, small_config, write_folder
from mlflow.tracking import MlflowClient
from sweep_helpers import import_script, run_bench, sweep_runs

from artefact.data.cache import PrepareParams, class_pixels, fold_names, read_index, side_rows
from artefact.data.prepare import prepare
from artefact.errors import UserError
from artefact.metrics import mean_iou
from artefact.report.comparison import compare_with_best, holm, paired_differences, verdicts
from artefact.report.folds import fold_rows, write_folds
from artefact.report.intervals import batch_miou, image_interval, per_image_counts
from artefact.report.trials import TrialSummary
from artefact.taxonomy import HEAD_LUTS
from artefact.train.checkpoint import VAL_IMAGES_FILE
from artefact.train.loop import train
from artefact.train.reporters import LocalReporter

QUIET = {"log": lambda *_: None}
CONTENTS = ("Line art", "Artistic depiction", "Geometric patterns")


def _source(root: Path, contents: tuple[str, ...] = CONTENTS) -> Path:
    """18 images of 12 source images (every third image shares its source with the one
    before), of 4 materials and the given content types."""
    materials = ("Paper", "Wood", "Glass", "Textile")
    rows = random_rows(18, size=(24, 20))
    for index, row in enumerate(rows):
        group = 2 * (index // 3) + (index % 3 > 0)
        row.group, row.content, row.material = f"g{group:02d}", contents[group % len(contents)], materials[group % 4]
    return write_folder(root, rows, columns=("id", "material", "content", "group"))


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _source(tmp_path_factory.mktemp("folds") / "src")


@pytest.mark.parametrize("cv", ["content", "material", "kfold:3"])
def test_every_fold_keeps_source_images_whole_and_validates_each_once(source: Path, tmp_path: Path, cv: str) -> None:
    cache = prepare(source, tmp_path / "cache", PrepareParams(cv=cv, augment_copies=2), **QUIET)
    rows, names = read_index(cache), fold_names(cache)
    originals = [row for row in rows if not row["copy_of"]]
    assert len(originals) == 18 and len(rows) == 18 * 3, "with folds, every image gets its copies"
    expected = {"content": sorted(CONTENTS), "material": ["Glass", "Paper", "Textile", "Wood"]}
    assert names == expected.get(cv, ["group 0", "group 1", "group 2"])
    validated: Counter[str] = Counter()
    for fold, name in enumerate(names):
        train, val = side_rows(rows, "train", fold), side_rows(rows, "val", fold)
        assert train and val
        assert not {row["group"] for row in train} & {row["group"] for row in val}, f"fold {fold} leaks a source image"
        assert not [row for row in val if row["copy_of"]], "a copy is never validated"
        by_id = {row["id"]: row for row in rows}
        assert all(by_id[row["copy_of"]]["fold"] != fold for row in train if row["copy_of"]), "copies train beside"
        assert len(train) == 3 * (18 - len(val)), "every other image trains, with its two copies"
        if cv in ("content", "material"):
            assert {row[cv] for row in val} == {name} and name not in {row[cv] for row in train}
        validated.update(row["id"] for row in val)
    assert validated == Counter(row["id"] for row in originals), "each image is validated in exactly one fold"
    # The split beside the folds still works (data.fold unset): copies of validation images stay out.
    assert not [row for row in side_rows(rows, "val") if row["copy_of"]]


def test_each_fold_weights_its_loss_by_its_own_training_pixels(source: Path, tmp_path: Path) -> None:
    cache = prepare(source, tmp_path / "cache", PrepareParams(cv="content", augment_copies=1), **QUIET)
    rows = read_index(cache)
    for fold in range(len(fold_names(cache))):
        fine = sum(
            np.bincount(np.load(cache / "masks" / f"{r['id']}.npy").ravel(), minlength=256)
            for r in rows
            if r["fold"] != fold
        )
        expected = [int(fine[HEAD_LUTS["coarse"] == class_id].sum()) for class_id in range(4)]
        assert class_pixels(cache, fold)["coarse"] == expected
    assert class_pixels(cache, 0) != class_pixels(cache, 1)
    with pytest.raises(UserError, match="data.fold = 7: the cache .* has folds 0 to 2"):
        class_pixels(cache, 7)


def test_a_fold_the_cache_lacks_is_refused_before_training(source: Path, tmp_path: Path, bad_input_tried) -> None:
    cache = prepare(source, tmp_path / "cache", PrepareParams(cv="kfold:3"), **QUIET)
    for fold, weighting in ((3, "none"), (7, "inverse_sqrt")):
        cfg = small_config(data={"cv": "kfold:3", "fold": fold}, loss={"class_weights": weighting})
        with pytest.raises(UserError, match=rf"data.fold = {fold}: the cache {cache} has folds 0 to 2\.$"):
            train(cfg, cache, LocalReporter(tmp_path / "out", **QUIET))
    plain = prepare(source, tmp_path / "plain", PrepareParams(), **QUIET)
    with pytest.raises(UserError, match=r"has no folds \(prepare it with --cv\)"):
        train(small_config(data={"cv": "content", "fold": 0}), plain, LocalReporter(tmp_path / "out", **QUIET))
    bad_input_tried("data.fold outside the cache's folds")


def test_fold_kinds_the_data_cannot_give_are_refused_in_one_line(tmp_path: Path, bad_input_tried) -> None:
    one_content = _source(tmp_path / "src", contents=("Line art",))
    with pytest.raises(
        UserError,
        match=r"data.cv = 'content' holds each content out in turn, but this data has only one \('Line art'\)",
    ):
        prepare(one_content, tmp_path / "cache", PrepareParams(cv="content"), **QUIET)
    with pytest.raises(UserError, match="asks for 13 folds, but the data has only 12 source images; lower K"):
        prepare(one_content, tmp_path / "cache", PrepareParams(cv="kfold:13"), **QUIET)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"], "nothing half-written"
    done = run_cli("prepare", "--source", str(one_content), "--out", str(tmp_path / "cache"), "--cv", "content")
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "use data.cv=kfold:K" in done.stderr
    bad_input_tried("--cv on data without the groups")


def test_a_cache_prepared_without_folds_is_refused_for_a_cv_sweep(
    source: Path, tmp_path: Path, capsys, bad_input_tried
) -> None:
    cache = prepare(source, tmp_path / "cache", PrepareParams(), **QUIET)
    code = import_script("encoder_bench").main(
        [
            *("--results", str(tmp_path / "results"), "--workspace", str(tmp_path / "ws")),
            *("--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--data", str(cache)),
            *("--mode", "fair", "--cv", "content"),
        ]
    )
    err = capsys.readouterr().err
    assert (
        code == 2
        and f"--cv content: the prepared cache {cache} has no folds; prepare it again with --cv content" in err
    )
    assert [p.name for p in (tmp_path / "results").glob("*") if not p.name.startswith(".")] == []
    bad_input_tried("--cv with a cache without folds")


def test_the_image_bootstrap_matches_hand_computed_intervals() -> None:
    # Two images of a 2-class problem: one all right (IoU 1, 1), one all wrong (IoU 0, 0).
    right = np.array([[5, 0], [0, 5]])
    wrong = np.array([[0, 5], [5, 0]])
    counts = np.stack([right, wrong])
    assert batch_miou(counts).tolist() == [1.0, 0.0]
    assert batch_miou(counts.sum(0)) == pytest.approx(mean_iou(torch.from_numpy(counts.sum(0))))
    # Resamples: {right, right} (1/4) score 1, {wrong, wrong} (1/4) 0, mixed (1/2) 1/3, so the
    # standard error is sqrt(1/4 + 1/18 - (5/12)^2) = 0.3632 around the score 1/3; z(75%) = 0.6745.
    low, high = image_interval([(None, counts)], confidence=0.5, rounds=4000)
    assert (low, high) == (pytest.approx(1 / 3 - 0.2450, abs=0.01), pytest.approx(1 / 3 + 0.2450, abs=0.01))
    assert image_interval([(None, counts)], rounds=4000) == (0.0, 1.0), "1/3 ± 0.71, clipped to [0, 1]"
    same = np.stack([right, right, right])
    assert image_interval([(0, same), (1, same)]) == (1.0, 1.0), "equal images: a point interval"
    # Trials on one fold share each round's resample: two identical seeds do not narrow it.
    shared = image_interval([(0, counts), (0, counts)], rounds=4000)
    assert shared == image_interval([(0, counts)], rounds=4000)


def test_one_pair_gets_no_p_value_and_the_sentence_says_why() -> None:
    (comparison,) = compare_with_best(
        {"a": {(0, 0): 0.40, (0, 1): 0.42}, "b": {(0, 0): 0.35, (0, 1): 0.33}}, "paired folds"
    )
    assert comparison.pairs == 1 and comparison.delta == pytest.approx(7.0), "two seeds on one fold: one pair"
    assert np.isnan(comparison.p_value) and comparison.tied
    assert comparison.sentence() == (
        "a leads b by Δ = 7.0 points on a single pair: no test is possible; run more folds (--cv material or kfold:K)."
    )
    assert holm([0.01, float("nan"), 0.04])[::2] == [0.02, 0.04] and np.isnan(holm([float("nan")])[0])
    (equal,) = compare_with_best({"a": {k: 0.3 for k in range(6)}, "b": {k: 0.3 for k in range(6)}})
    assert equal.delta == 0.0 and equal.p_value == 1.0 and "not separable" in equal.sentence()


def test_folds_not_fold_seed_runs_are_the_pairs_and_a_missing_fold_is_named() -> None:
    # Seeds on a fold share its images: their differences are averaged into one pair per fold.
    best = {(fold, seed): 0.40 + 0.01 * fold + 0.002 * seed for fold in range(4) for seed in range(3)}
    rival = {key: score - 0.02 for key, score in best.items()}
    assert paired_differences(best, rival) == pytest.approx([2.0] * 4)
    rival[(3, 0)] += 0.03  # one seed of fold 3 goes the other way: that fold's mean, not three flips
    assert paired_differences(best, rival) == pytest.approx([2.0, 2.0, 2.0, 1.0])
    (comparison,) = compare_with_best({"a": best, "b": rival}, "paired folds")
    assert comparison.pairs == 4 and comparison.p_value == pytest.approx(2 / 16) and comparison.rivals == 1
    assert comparison.sentence().endswith("4 paired folds cannot separate them at 5% (6 or more can).")

    def trial(encoder: str, fold: int, score: float) -> TrialSummary:
        return TrialSummary(
            f"{encoder}{fold}",
            {"encoder": encoder, "fold": fold, "seed": 0},
            "completed",
            1,
            best={"val/miou_fine": score},
        )

    summaries = [trial("a", fold, 0.3) for fold in range(4)] + [trial("b", fold, 0.5) for fold in range(3)]
    _, lines = verdicts(summaries)
    assert "b was scored on 3 of 4 fold × seed runs: its mean leaves out the failed ones." in lines


def test_the_fold_view_names_each_encoders_worst_fold(tmp_path: Path) -> None:
    def trial(encoder: str, fold: int, seed: int, score: float, outcome: str = "completed") -> TrialSummary:
        best = {"val/miou_fine": score, "val/iou/Clean": score + 0.5, "val/iou/Dust": score / 2}
        return TrialSummary(
            f"{encoder}{fold}{seed}", {"encoder": encoder, "fold": fold, "seed": seed}, outcome, 1, best=best
        )

    names = ["Line art", "Photographic depiction"]
    summaries = [trial("a", 0, 0, 0.30), trial("a", 0, 1, 0.40), trial("a", 1, 0, 0.20), trial("a", 1, 1, 0.10)]
    summaries += [trial("b", 0, 0, 0.10), trial("b", 1, 0, 0.30), trial("b", 0, 1, 0.9, "failed")]
    best, second = fold_rows(summaries, names)
    assert (best.encoder, best.worst) == ("a", "Photographic depiction")
    assert best.by_fold == pytest.approx({"Line art": 0.35, "Photographic depiction": 0.15})
    assert best.mean == pytest.approx(0.25) and best.worst_classes == pytest.approx({"Clean": 0.65, "Dust": 0.075})
    assert (second.encoder, second.worst, second.mean) == ("b", "Line art", pytest.approx(0.2)), (
        "failed trials never count"
    )
    folds_csv, classes_csv, heatmap = write_folds([best, second], names, tmp_path, tmp_path / "plots", "content")
    written = [(r["encoder"], r["held_out"], float(r["miou_fine"])) for r in csv.DictReader(folds_csv.open())]
    assert written == [
        ("a", "Line art", pytest.approx(0.35)),
        ("a", "Photographic depiction", pytest.approx(0.15)),
        ("b", "Line art", 0.1),
        ("b", "Photographic depiction", 0.3),
    ]
    assert heatmap.stat().st_size > 0 and len(list(csv.DictReader(classes_csv.open()))) == 4


@pytest.mark.slow
@pytest.mark.ray
def test_a_content_cv_sweep_trains_every_encoder_on_every_fold_and_reports_them(
    tmp_path: Path, synthetic_workspace: Path
) -> None:
    results, store = tmp_path / "results", tmp_path / "mlflow.db"
    done = run_bench(
        results,
        synthetic_workspace,
        store,
        *("--name", "cv", "--mode", "fair", "--cv", "content", "--seeds", "1", "--epochs", "1"),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    sweep = results / "cv"
    names = ["Artistic depiction", "Geometric patterns", "Line art", "Photographic depiction"]
    assert f"cross-validation by content: 4 folds, each holding out one of {', '.join(names)}" in done.stdout
    recorded = json.loads((sweep / "folds.json").read_text())
    assert recorded["cv"] == "content" and [fold["held_out"] for fold in recorded["folds"]] == names
    assert all(fold["val_images"] == 12 and fold["train_images"] == 36 for fold in recorded["folds"])
    parent, children = sweep_runs(store, "cv")
    assert "folds.json" in {a.path for a in MlflowClient(f"sqlite:///{store}").list_artifacts(parent.info.run_id)}
    runs = Counter(
        (child.data.params["encoder"], child.data.params["fold"], child.data.params["cv"]) for child in children
    )
    assert runs == Counter(
        {(e, str(f), "content"): 1 for e in ("tu-test_convnext", "tu-test_resnet") for f in range(4)}
    )

    board = (sweep / "leaderboard.md").read_text()
    assert "| encoder | " + " | ".join(names) + " | mean ± std | worst fold |" in board
    assert "## IoU per class on each encoder's worst fold" in board
    assert "fine mIoU per held-out fold (mean over seeds):" in done.stdout
    (comparison,) = csv.DictReader((sweep / "comparison.csv").open())
    assert comparison["pairs"] == "4" and comparison["unit"] == "paired folds"
    assert "4 paired folds cannot separate them at 5% (6 or more can)." in done.stdout
    assert len(list(csv.DictReader((sweep / "folds.csv").open()))) == 8
    assert (sweep / "plots" / "folds.png").stat().st_size > 0

    # Each trial kept its best epoch's counts per validation image: they sum to its score,
    # and the leaderboard's interval comes from them.
    trials = list(csv.DictReader((sweep / "trials.csv").open()))
    for trial in trials:
        summary = TrialSummary(
            trial["trial_id"], {"fold": int(trial["fold"])}, "completed", 1, best_checkpoint=trial["best_checkpoint"]
        )
        counts = per_image_counts(summary)
        assert counts is not None and counts.shape == (12, 16, 16), VAL_IMAGES_FILE
        assert mean_iou(torch.from_numpy(counts.sum(0))) == pytest.approx(float(trial["val/miou_fine"]))
    for row in csv.DictReader((sweep / "leaderboard.csv").open()):
        low, high = float(row["miou_fine_ci95_low"]), float(row["miou_fine_ci95_high"])
        assert 0.0 <= low < float(row["miou_fine"]) < high <= 1.0, "the interval is around the encoder's score"
