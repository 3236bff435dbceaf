"""Means with Student's t confidence intervals: how a comparison over seeds states its noise."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["Interval", "t_interval"]


@dataclass(frozen=True)
class Interval:
    """The mean of ``n`` values, their sample standard deviation and a two-sided confidence interval.

    With one value the deviation and the interval are NaN: one seed says nothing about noise.
    """

    mean: float
    sd: float
    low: float
    high: float
    n: int

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval lies wholly above or below 0 (a difference distinguishable from noise)."""
        return self.low > 0 or self.high < 0


def t_interval(values: Iterable[float], confidence: float = 0.95) -> Interval:
    """Mean +- t_{(1+confidence)/2, n-1} * sd / sqrt(n) over the non-NaN ``values``."""
    from scipy import stats  # noqa: PLC0415 - heavy: scipy

    kept = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    n = len(kept)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, math.nan, 0)
    mean = sum(kept) / n
    if n == 1:
        return Interval(mean, math.nan, math.nan, math.nan, 1)
    sd = math.sqrt(sum((v - mean) ** 2 for v in kept) / (n - 1))
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * sd / math.sqrt(n)
    return Interval(mean, sd, mean - half, mean + half, n)
