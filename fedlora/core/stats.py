"""Means with Student's t confidence intervals: how a comparison over seeds states its noise."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["Gain", "Interval", "paired_gain", "t_interval", "verdicts"]


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


@dataclass(frozen=True)
class Gain:
    """How much better one model does than another on the same examples, and the noise of that.

    ``mean`` is the mean paired per-example difference: accuracy for classification, loss
    (the other's minus this one's) for causal LMs, so positive is always better; ``se`` is
    its standard error (NaN with fewer than 2 examples).
    """

    mean: float
    se: float

    def verdict(self, z: float = 1.96) -> int:
        """+1 better, -1 worse, 0 a tie within ``z`` standard errors (NaN: a tie)."""
        if math.isnan(self.mean):
            return 0
        noise = 0.0 if math.isnan(self.se) else z * self.se
        if abs(self.mean) <= noise:
            return 0
        return 1 if self.mean > 0 else -1


def verdicts(gains: Iterable[Gain], z: float = 1.96) -> dict[str, int]:
    """How many of ``gains`` are better, tied within their noise, and worse."""
    found = [g.verdict(z) for g in gains]
    return {"better": found.count(1), "tied": found.count(0), "worse": found.count(-1)}


def paired_gain(a: Sequence[float], b: Sequence[float]) -> Gain:
    """The mean of ``a[i] - b[i]`` over paired examples (higher is better) and its standard error.

    Unpaired or empty inputs give NaN.
    """
    if len(a) != len(b) or not a:
        return Gain(math.nan, math.nan)
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    n = len(diffs)
    mean = sum(diffs) / n
    if n < 2:
        return Gain(mean, math.nan)
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1)
    return Gain(mean, math.sqrt(var / n))
