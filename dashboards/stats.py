"""The statistics of a comparison, as pure functions over counts.

Choices (the README explains them to analysts):

- Confidence interval of a rate: Wilson score, 95 %. Unlike the normal ("Wald") interval it
  stays inside [0, 1] and keeps its coverage for small groups and rates near 0 or 1, which
  is where reply and unsubscribe rates live.
- Difference against the baseline: two-sided two-proportion z-test with the pooled rate
  (the same as Pearson's chi-square on the 2x2 table, without continuity correction) when
  every expected cell count is at least 5; otherwise Fisher's exact test, because the normal
  approximation is not to be trusted there.
- Many groups, one baseline: Holm's step-down correction of the p-values, which controls the
  family-wise error rate like Bonferroni but rejects more often, and needs no assumption
  about how the tests depend on each other (they share the baseline).
- Too small to conclude: a group whose denominator is under ``MIN_TRIALS`` or whose
  successes or failures are under ``MIN_EVENTS`` gets a warning, significant or not: its
  rate is too unstable to act on, and "not significant" there says nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from scipy.stats import fisher_exact, norm

CONFIDENCE = 0.95
ALPHA = 0.05
MIN_TRIALS = 30
MIN_EVENTS = 5  # the textbook n·p >= 5 and n·(1-p) >= 5 of the normal approximation


@dataclass(frozen=True)
class TestResult:
    p_value: float
    test: str  # "z" | "fisher"


def rate(successes: int, trials: int) -> float | None:
    return successes / trials if trials else None


def wilson_interval(
    successes: int, trials: int, confidence: float = CONFIDENCE
) -> tuple[float, float] | None:
    """Wilson score interval of successes/trials; None when there is nothing to estimate."""
    if trials <= 0:
        return None
    if not 0 <= successes <= trials:
        raise ValueError(f"successes {successes} outside 0..{trials}")
    z = float(norm.ppf(0.5 + confidence / 2))
    p = successes / trials
    z2n = z * z / trials
    centre = (p + z2n / 2) / (1 + z2n)
    half = z * math.sqrt(p * (1 - p) / trials + z2n / (4 * trials)) / (1 + z2n)
    lo = 0.0 if successes == 0 else max(0.0, centre - half)  # exact at the edges, where
    hi = 1.0 if successes == trials else min(1.0, centre + half)  # rounding would miss them
    return lo, hi


def two_proportion_test(x1: int, n1: int, x2: int, n2: int) -> TestResult | None:
    """Two-sided test of x1/n1 against x2/n2; None when either group has no trials."""
    if n1 <= 0 or n2 <= 0:
        return None
    for x, n in ((x1, n1), (x2, n2)):
        if not 0 <= x <= n:
            raise ValueError(f"successes {x} outside 0..{n}")
    pooled = (x1 + x2) / (n1 + n2)
    expected = min(n * share for n in (n1, n2) for share in (pooled, 1 - pooled))
    if expected < MIN_EVENTS:
        _, p_value = fisher_exact([[x1, n1 - x1], [x2, n2 - x2]], alternative="two-sided")
        return TestResult(min(1.0, float(p_value)), "fisher")
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    z = (x1 / n1 - x2 / n2) / se
    return TestResult(float(2 * norm.sf(abs(z))), "z")


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm-adjusted p-values (None stays None and does not count as a comparison)."""
    present = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    m = len(present)
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(present):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


def small_sample_warning(successes: int, trials: int, event: str = "successes") -> str | None:
    """Why a group is too small to conclude from (None when it is not); ``event`` names what
    is counted, e.g. "human-opened", for a message an analyst understands."""
    if trials < MIN_TRIALS:
        return f"too small to conclude: {trials} sends (fewer than {MIN_TRIALS})"
    if min(successes, trials - successes) < MIN_EVENTS:
        return (f"too small to conclude: {successes} of {trials} {event} "
                f"(needs at least {MIN_EVENTS} with and {MIN_EVENTS} without)")
    return None
