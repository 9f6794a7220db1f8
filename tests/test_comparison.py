"""A fair sweep's leaderboard says how sure its ranking is: each encoder against the best on
the same seeds, with a paired permutation test, Holm's correction and bootstrap intervals."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from artefact.report.comparison import (
    bootstrap_interval,
    compare_with_best,
    first_place_share,
    holm,
    pairs_needed,
    permutation_p,
    verdicts,
)
from artefact.report.leaderboard import leaderboard, write_leaderboard
from artefact.report.trials import TrialSummary


def _seeds(encoder: str, scores: list[float]) -> list[TrialSummary]:
    return [
        TrialSummary(f"{encoder}-{seed}", {"encoder": encoder, "seed": seed}, "completed", 5, best={"val/miou_fine": s})
        for seed, s in enumerate(scores)
    ]


def test_the_permutation_test_is_exact_over_every_sign_flip() -> None:
    assert permutation_p([1.0, 2.0, 0.5, 3.0, 1.5]) == pytest.approx(2 / 32)  # only all-+ and all-- as extreme
    assert permutation_p([1.0] * 6) == pytest.approx(2 / 64)
    assert permutation_p([1.0, -1.0]) == 1.0
    assert permutation_p([3.0, -1.0, 2.0]) == pytest.approx(4 / 8)  # +3-1+2 = 4: flips with |sum| >= 4


def test_holm_steps_down_and_never_reverses_the_order() -> None:
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5]) == [0.5]
    assert holm([0.6, 0.6]) == [1.0, 1.0]


def test_the_bootstrap_interval_holds_the_mean_and_is_a_point_for_equal_pairs() -> None:
    assert bootstrap_interval([2.0, 2.0, 2.0]) == (2.0, 2.0)
    low, high = bootstrap_interval([0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    assert 0.0 <= low < 2.5 < high <= 5.0


def test_three_seeds_cannot_separate_and_the_sentence_says_so() -> None:
    scores = {
        "mit_b3": {0: 0.30, 1: 0.31, 2: 0.32},
        "convnext_tiny": {0: 0.29, 1: 0.30, 2: 0.31},
    }
    (comparison,) = compare_with_best(scores)
    assert (comparison.best, comparison.encoder, comparison.pairs) == ("mit_b3", "convnext_tiny", 3)
    assert comparison.delta == pytest.approx(1.0) and comparison.p_value == pytest.approx(0.25)
    assert comparison.tied
    assert comparison.sentence() == (
        "mit_b3 and convnext_tiny are not separable on this data: Δ = 1.0 [1.0, 1.0] points, p = 0.25;"
        " 3 paired seeds cannot separate them at 5% (6 or more can)."
    )


def test_a_lead_on_every_one_of_eight_seeds_separates_and_holm_counts_every_rival() -> None:
    best = [0.40, 0.41, 0.42, 0.40, 0.43, 0.41, 0.42, 0.44]
    scores = {
        "swin_tiny": dict(enumerate(best)),
        "coatnet_0": {seed: s - 0.05 for seed, s in enumerate(best)},
        "convnext_tiny": {seed: s + (0.01 if seed % 2 else -0.012) for seed, s in enumerate(best)},
    }
    comparisons = {c.encoder: c for c in compare_with_best(scores)}
    assert set(comparisons) == {"coatnet_0", "convnext_tiny"}
    beaten, close = comparisons["coatnet_0"], comparisons["convnext_tiny"]
    assert beaten.p_value == pytest.approx(2 / 256) and beaten.p_holm == pytest.approx(2 * 2 / 256)
    assert not beaten.tied and beaten.sentence().startswith("swin_tiny beats coatnet_0 on this data: Δ = 5.0")
    assert close.tied and close.p_holm >= close.p_value
    assert first_place_share(scores) == {"swin_tiny": 0.5, "coatnet_0": 0.0, "convnext_tiny": 0.5}


def test_a_fair_leaderboard_writes_the_comparisons_and_a_search_does_not(tmp_path: Path) -> None:
    summaries = [*_seeds("mit_b3", [0.30, 0.31, 0.32]), *_seeds("convnext_tiny", [0.29, 0.30, 0.31])]
    summaries.append(TrialSummary("x", {"encoder": "swin_tiny", "seed": 0}, "failed", 1, "boom"))  # never compared
    judged = verdicts(summaries)
    files = write_leaderboard(
        leaderboard(summaries, "fair", uses_gpus=True), summaries, "fair", tmp_path / "fair", judged
    )
    assert [f.name for f in files] == ["leaderboard.csv", "leaderboard.md", "comparison.csv", "trials.csv"]
    (row,) = csv.DictReader((tmp_path / "fair" / "comparison.csv").open())
    assert (row["best"], row["encoder"], row["pairs"], row["tied"]) == ("mit_b3", "convnext_tiny", "3", "True")
    board = (tmp_path / "fair" / "leaderboard.md").read_text()
    assert "Compared with the best on the same seeds (and folds):" in board
    assert "- mit_b3 and convnext_tiny are not separable on this data" in board
    assert "- Ranked first on the 3 shared seeds: mit_b3 100%, convnext_tiny 0%." in board
    assert judged[1][-1] == "Ranked first on the 3 shared seeds: mit_b3 100%, convnext_tiny 0%."

    searched = write_leaderboard(
        leaderboard(summaries, "search", uses_gpus=True), summaries, "search", tmp_path / "search"
    )
    assert "comparison.csv" not in [f.name for f in searched]
    assert "Compared with the best" not in (tmp_path / "search" / "leaderboard.md").read_text()


def test_many_pairs_use_random_flips_and_never_report_p_zero() -> None:
    p = permutation_p([1.0 + 0.01 * i for i in range(20)])  # 2^20 flips: too many to enumerate
    assert 0 < p <= 2 / 20_001
    assert permutation_p([(-1.0) ** i for i in range(20)]) > 0.5


def test_the_seeds_a_verdict_needs_grow_with_the_encoders_holm_counts() -> None:
    assert [pairs_needed(rivals) for rivals in (1, 2, 4, 8)] == [6, 7, 8, 9]
    scores = {name: {seed: base + 0.01 * seed for seed in range(7)} for name, base in (("a", 0.5), ("b", 0.4))}
    scores.update({name: {seed: 0.3 for seed in range(7)} for name in ("c", "d", "e")})
    comparisons = compare_with_best(scores)  # poc58's five encoders: four rivals, so 7 seeds cannot separate
    assert all(c.rivals == 4 and c.tied for c in comparisons)
    assert comparisons[0].sentence().endswith("7 paired seeds cannot separate them at 5% (8 or more can).")


def test_a_rival_ahead_on_the_shared_seeds_is_named_the_winner() -> None:
    """The best by mean over its own seeds can trail on the seeds both ran (a failed seed)."""
    scores = {
        "a": {0: 0.95, 8: 0.95, 9: 0.95, **{seed: 0.30 for seed in range(1, 8)}},
        "b": {seed: 0.40 for seed in range(1, 8)},
    }
    (comparison,) = compare_with_best(scores)
    assert comparison.best == "a" and comparison.delta == pytest.approx(-10.0) and not comparison.tied
    assert comparison.sentence().startswith("b beats a on this data: Δ = -10.0")
