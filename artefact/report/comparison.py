"""Is the leader really better? In fair mode every encoder trains on the same seeds, so each
one is compared with the best on those seeds, pair by pair: the mean difference in fine mIoU
points, its 95% bootstrap interval, an exact paired permutation test, Holm-corrected across
encoders; and how often each encoder ranks first. A leaderboard of means alone cannot say
whether a point's lead is noise.
"""

from __future__ import annotations

import itertools
import math
import random
import statistics
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
    """The best encoder minus ``encoder``, in mIoU points, over their shared seeds."""

    encoder: str
    best: str
    pairs: int
    delta: float
    low: float
    high: float
    p_value: float
    p_holm: float
    rivals: int
    """Encoders compared with the best: Holm multiplies the smallest p by this many."""

    @property
    def tied(self) -> bool:
        """Not separable from the best at the 5% level, after Holm's correction."""
        return self.p_holm >= ALPHA

    def sentence(self) -> str:
        interval = f"Δ = {self.delta:.1f} [{self.low:.1f}, {self.high:.1f}] points, p = {self.p_holm:.2g}"
        if not self.tied:
            winner, loser = (self.best, self.encoder) if self.delta > 0 else (self.encoder, self.best)
            return f"{winner} beats {loser} on this data: {interval} ({self.pairs} paired seeds)."
        verdict = f"{self.best} and {self.encoder} are not separable on this data: {interval}"
        needed = seeds_needed(self.rivals)
        if self.pairs < needed:  # even a lead on every seed could not reach 5%
            return f"{verdict}; {self.pairs} paired seeds cannot separate them at 5% ({needed} or more can)."
        return f"{verdict} ({self.pairs} paired seeds)."


def seeds_needed(rivals: int) -> int:
    """The fewest pairs whose exact test, Holm-adjusted over ``rivals`` comparisons, can reach
    5%: a lead on every pair has p = 2 / 2^n, multiplied by ``rivals`` at worst."""
    pairs = 1
    while rivals * 2 / 2**pairs >= ALPHA:
        pairs += 1
    return pairs


def seed_scores(summaries: list[TrialSummary]) -> dict[str, dict[object, float]]:
    """Each encoder's best fine mIoU per seed, from trials that were scored."""
    scores: dict[str, dict[object, float]] = {}
    for summary in summaries:
        if summary.outcome != "failed" and METRIC in summary.best:
            by_seed = scores.setdefault(str(summary.params.get("encoder")), {})
            by_seed[summary.params.get("seed")] = summary.best[METRIC]
    return scores


def compare_with_best(scores: dict[str, dict[object, float]]) -> list[Comparison]:
    """Every other encoder against the one with the highest mean, on the seeds both ran."""
    ranked = sorted(scores, key=lambda encoder: -statistics.fmean(scores[encoder].values()))
    if len(ranked) < 2:
        return []
    best = ranked[0]
    raw = []
    for encoder in ranked[1:]:
        seeds = sorted(set(scores[best]) & set(scores[encoder]), key=str)
        if not seeds:
            continue
        differences = [100 * (scores[best][seed] - scores[encoder][seed]) for seed in seeds]
        low, high = bootstrap_interval(differences)
        raw.append((encoder, len(seeds), statistics.fmean(differences), low, high, permutation_p(differences)))
    adjusted = holm([row[-1] for row in raw])
    return [
        Comparison(e, best, n, d, lo, hi, p, q, len(raw)) for (e, n, d, lo, hi, p), q in zip(raw, adjusted, strict=True)
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
    """Holm's step-down adjustment: family-wise error held at the nominal level."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted = [0.0] * len(p_values)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


def first_place_share(scores: dict[str, dict[object, float]]) -> dict[str, float]:
    """For the seeds every encoder ran: the share in which each one scored highest."""
    shared = set.intersection(*(set(by_seed) for by_seed in scores.values())) if scores else set()
    wins = dict.fromkeys(scores, 0)
    for seed in shared:
        wins[max(scores, key=lambda encoder: scores[encoder][seed])] += 1
    return {encoder: count / len(shared) for encoder, count in wins.items()} if shared else {}


def verdicts(summaries: list[TrialSummary]) -> tuple[list[Comparison], list[str]]:
    """A fair sweep's comparisons, and what the terminal and leaderboard.md say of them."""
    scores = seed_scores(summaries)
    comparisons = compare_with_best(scores)
    lines = [comparison.sentence() for comparison in comparisons]
    share = first_place_share(scores)
    if lines and share:
        seeds = len(set.intersection(*(set(by_seed) for by_seed in scores.values())))
        ranked = sorted(share.items(), key=lambda item: -item[1])
        lines.append(f"Ranked first on the {seeds} shared seeds: " + ", ".join(f"{e} {s:.0%}" for e, s in ranked) + ".")
    return comparisons, lines
