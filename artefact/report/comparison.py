"""Is the leader really better? In fair mode every encoder trains on the same seeds (and
folds, with ``data.cv``), so each one is compared with the best on those, pair by pair: the
mean difference in fine mIoU points, its 95% bootstrap interval, an exact paired permutation
test, Holm-corrected across encoders; and how often each encoder ranks first. A leaderboard
of means alone cannot say whether a point's lead is noise.

With folds the pairs are folds, each the mean over its shared seeds: seeds on one fold are
scored on the same images, so treating every fold x seed as independent would make the
p-values too small and the intervals too narrow.
"""

from __future__ import annotations

import itertools
import math
import random
import statistics
from collections import defaultdict
from dataclasses import dataclass

from artefact.report.trials import TrialSummary

METRIC = "val/miou_fine"
ALPHA = 0.05
BOOTSTRAP_ROUNDS = 10_000
EXACT_PAIRS = 16
"""Up to this many pairs the permutation test enumerates every sign flip (65,536)."""
RANDOM_FLIPS = 20_000


@dataclass(frozen=True)
class Comparison:
    """The best encoder minus ``encoder``, in mIoU points, over their shared seeds (or folds);
    with one pair no test is possible and the p-values are NaN."""

    encoder: str
    best: str
    pairs: int
    delta: float
    low: float
    high: float
    p_value: float
    p_holm: float
    rivals: int
    """Encoders tested against the best: Holm multiplies the smallest p by this many."""
    unit: str = "paired seeds"
    """What a pair is, in the sentences: ``paired seeds`` or ``paired folds``."""

    @property
    def tied(self) -> bool:
        """Not separable from the best at the 5% level, after Holm's correction (nor by one pair)."""
        return not self.p_holm < ALPHA

    def sentence(self) -> str:
        if self.pairs < 2:
            more = "more folds (--cv material or kfold:K)" if self.unit == "paired folds" else "more seeds (--seeds)"
            return (
                f"{self.best} leads {self.encoder} by Δ = {self.delta:.1f} points on a single pair: no test is"
                f" possible; run {more}."
            )
        interval = f"Δ = {self.delta:.1f} [{self.low:.1f}, {self.high:.1f}] points, p = {self.p_holm:.2g}"
        if not self.tied:
            winner, loser = (self.best, self.encoder) if self.delta > 0 else (self.encoder, self.best)
            return f"{winner} beats {loser} on this data: {interval} ({self.pairs} {self.unit})."
        verdict = f"{self.best} and {self.encoder} are not separable on this data: {interval}"
        needed = pairs_needed(self.rivals)
        if self.pairs < needed:  # even a lead on every pair could not reach 5%
            return f"{verdict}; {self.pairs} {self.unit} cannot separate them at 5% ({needed} or more can)."
        return f"{verdict} ({self.pairs} {self.unit})."


def pairs_needed(rivals: int) -> int:
    """The fewest pairs whose exact test, Holm-adjusted over ``rivals`` comparisons, can reach
    5%: a lead on every pair has p = 2 / 2^n, multiplied by ``rivals`` at worst."""
    pairs = 1
    while rivals * 2 / 2**pairs >= ALPHA:
        pairs += 1
    return pairs


def pair_scores(summaries: list[TrialSummary]) -> dict[str, dict[object, float]]:
    """Each encoder's best fine mIoU per seed (per (fold, seed) with folds), from trials that were scored."""
    scores: dict[str, dict[object, float]] = {}
    for summary in summaries:
        if summary.outcome != "failed" and METRIC in summary.best:
            by_pair = scores.setdefault(str(summary.params.get("encoder")), {})
            seed = summary.params.get("seed")
            by_pair[seed if "fold" not in summary.params else (summary.params["fold"], seed)] = summary.best[METRIC]
    return scores


def paired_differences(best: dict[object, float], rival: dict[object, float]) -> list[float]:
    """``best`` minus ``rival`` in points on each run both scored; with folds (keys (fold,
    seed)), one difference per fold: the mean over its shared seeds."""
    shared = sorted(set(best) & set(rival), key=str)
    if not shared or not isinstance(shared[0], tuple):
        return [100 * (best[key] - rival[key]) for key in shared]
    by_fold: dict[object, list[float]] = defaultdict(list)
    for fold, seed in shared:
        by_fold[fold].append(100 * (best[(fold, seed)] - rival[(fold, seed)]))
    return [statistics.fmean(differences) for differences in by_fold.values()]


def compare_with_best(scores: dict[str, dict[object, float]], unit: str = "paired seeds") -> list[Comparison]:
    """Every other encoder against the one with the highest mean, on the pairs both ran."""
    ranked = sorted(scores, key=lambda encoder: -statistics.fmean(scores[encoder].values()))
    if len(ranked) < 2:
        return []
    best = ranked[0]
    raw = []
    for encoder in ranked[1:]:
        differences = paired_differences(scores[best], scores[encoder])
        if not differences:
            continue
        low, high = bootstrap_interval(differences)
        p_value = permutation_p(differences) if len(differences) > 1 else math.nan
        raw.append((encoder, len(differences), statistics.fmean(differences), low, high, p_value))
    adjusted = holm([row[-1] for row in raw])
    tested = sum(not math.isnan(row[-1]) for row in raw)
    return [
        Comparison(e, best, n, d, lo, hi, p, q, tested, unit)
        for (e, n, d, lo, hi, p), q in zip(raw, adjusted, strict=True)
    ]


def permutation_p(differences: list[float]) -> float:
    """Two-sided p of a paired sign-flip permutation test on the mean difference: exact up to
    ``EXACT_PAIRS`` pairs, else from ``RANDOM_FLIPS`` random flips."""
    observed = abs(statistics.fmean(differences)) - 1e-12
    if len(differences) <= EXACT_PAIRS:
        flips = itertools.product((1, -1), repeat=len(differences))
        means = [abs(statistics.fmean(s * d for s, d in zip(signs, differences, strict=True))) for signs in flips]
        return sum(mean >= observed for mean in means) / len(means)
    draw = random.Random(0)
    means = [abs(statistics.fmean(d * draw.choice((1, -1)) for d in differences)) for _ in range(RANDOM_FLIPS)]
    return (sum(mean >= observed for mean in means) + 1) / (RANDOM_FLIPS + 1)  # never 0: the observed counts too


def bootstrap_interval(differences: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the mean difference, resampling the pairs."""
    if len(differences) < 2:
        return differences[0], differences[0]
    draw = random.Random(0)
    means = sorted(statistics.fmean(draw.choices(differences, k=len(differences))) for _ in range(BOOTSTRAP_ROUNDS))
    tail = (1 - confidence) / 2
    return means[int(tail * BOOTSTRAP_ROUNDS)], means[math.ceil((1 - tail) * BOOTSTRAP_ROUNDS) - 1]


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment: family-wise error held at the nominal level. A NaN (no
    test was possible) stays NaN and is not counted."""
    tested = [i for i, p in enumerate(p_values) if not math.isnan(p)]
    order = sorted(tested, key=lambda i: p_values[i])
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(tested) - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


def first_place_share(scores: dict[str, dict[object, float]]) -> dict[str, float]:
    """For the seeds (or fold x seed pairs) every encoder ran: the share in which each one scored highest."""
    shared = set.intersection(*(set(by_seed) for by_seed in scores.values())) if scores else set()
    wins = dict.fromkeys(scores, 0)
    for seed in shared:
        wins[max(scores, key=lambda encoder: scores[encoder][seed])] += 1
    return {encoder: count / len(shared) for encoder, count in wins.items()} if shared else {}


def verdicts(summaries: list[TrialSummary]) -> tuple[list[Comparison], list[str]]:
    """A fair sweep's comparisons, and what the terminal and leaderboard.md say of them."""
    scores = pair_scores(summaries)
    folded = any("fold" in summary.params for summary in summaries)
    comparisons = compare_with_best(scores, "paired folds" if folded else "paired seeds")
    lines = [comparison.sentence() for comparison in comparisons]
    runs = "fold × seed runs" if folded else "seeds"
    most = max((len(by_pair) for by_pair in scores.values()), default=0)
    for encoder, by_pair in scores.items():
        if len(by_pair) < most:  # a failed fold is often the hardest: the mean flatters
            lines.append(
                f"{encoder} was scored on {len(by_pair)} of {most} {runs}: its mean leaves out the failed ones."
            )
    share = first_place_share(scores)
    if comparisons and share:
        pairs = len(set.intersection(*(set(by_pair) for by_pair in scores.values())))
        ranked = ", ".join(f"{e} {s:.0%}" for e, s in sorted(share.items(), key=lambda item: -item[1]))
        lines.append(f"Ranked first on the {pairs} shared {runs}: {ranked}.")
    return comparisons, lines
