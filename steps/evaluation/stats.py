"""The statistics behind "is this difference real": a binomial proportion's interval and the exact
McNemar test on paired right/wrong outcomes. Plain functions of counts."""

from __future__ import annotations

import math

Z_95 = 1.959963984540054


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95% by default): honest near 0 and 1 and for
    small samples, where the normal approximation is not."""
    if trials <= 0:
        return (float("nan"), float("nan"))
    share = successes / trials
    denominator = 1 + z * z / trials
    centre = (share + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(share * (1 - share) / trials + z * z / (4 * trials * trials))
    half /= denominator
    # The interval holds the share by construction; rounding can put a bound a hair past it
    # (a low of 1e-17 at 0 successes), which a chart's error bar then rejects as negative.
    return (min(share, max(0.0, centre - half)), max(share, min(1.0, centre + half)))


def mcnemar_exact_p(lost: int, gained: int) -> float:
    """Two-sided exact McNemar p-value for paired outcomes: of the items where two models
    disagree, `lost` went right -> wrong and `gained` wrong -> right. Under "no difference"
    each flip goes either way with probability 1/2 (a binomial test on the discordant pairs)."""
    flips = lost + gained
    if flips == 0:
        return 1.0
    tail = sum(math.comb(flips, k) for k in range(min(lost, gained) + 1)) / 2**flips
    return min(1.0, 2 * tail)
