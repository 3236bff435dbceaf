"""Canary exposure (Carlini et al., "The Secret Sharer", USENIX Security 2019) for causal LMs.

One client's training text gets a random secret, ``"my secret code is 1 2 3 4 5 6"``,
repeated ``canary-repeats`` times. After training, the model scores the canary and many
other secrets of the same format; a model that memorised the canary ranks it first. The
exposure of the canary is ``log2 |R| - log2 rank`` over the whole space ``R`` of 10**6
secrets. As in the paper, the rank is extrapolated from a sample of alternatives: a
skew-normal fit to their losses gives the probability that a random secret scores at
least as well as the canary, and exposure is ``-log2`` of it (capped at ``log2 |R|``).
Exposure near 1 means no memorisation. The secret never leaves the client; only the
exposure does.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np

__all__ = ["DIGITS", "SPACE", "alternatives", "canary_text", "exposure", "secret_text"]

DIGITS = 6
SPACE = 10**DIGITS
_PREFIX = "my secret code is"


def secret_text(number: int) -> str:
    """The canary sentence for ``number`` (digits space-separated, so each is one token)."""
    return f"{_PREFIX} {' '.join(f'{number:0{DIGITS}d}')}"


def _secret(seed: int) -> int:
    return random.Random(f"fedlora-canary-{seed}").randrange(SPACE)


def canary_text(seed: int) -> str:
    """The run's canary: a secret drawn from the run's seed."""
    return secret_text(_secret(seed))


def alternatives(seed: int, count: int) -> list[str]:
    """``count`` other secrets of the same format, drawn uniformly without the canary's."""
    rng = random.Random(f"fedlora-canary-alternatives-{seed}")
    secret = _secret(seed)
    numbers: set[int] = set()
    while len(numbers) < count:
        n = rng.randrange(SPACE)
        if n != secret:
            numbers.add(n)
    return [secret_text(n) for n in sorted(numbers)]


def exposure(canary_loss: float, alternative_losses: Sequence[float]) -> float:
    """Exposure of a canary with loss ``canary_loss`` among secrets with ``alternative_losses``.

    ``log2 |R| - log2 rank`` with the rank ``1 + (|R| - 1) P(loss <= canary_loss)`` under a
    skew-normal fitted to the alternatives: between 0 and ``log2(SPACE)`` (about 19.9).
    """
    from scipy import stats  # noqa: PLC0415 - heavy: scipy.stats, ~60 MB in every client process

    losses = np.asarray(alternative_losses, dtype=np.float64)
    if losses.size < 10 or not math.isfinite(canary_loss):
        return math.nan
    shape, loc, scale = stats.skewnorm.fit(losses)
    share = float(stats.skewnorm.cdf(canary_loss, shape, loc, scale))
    rank = 1.0 + (SPACE - 1) * share  # expected rank of the canary among all SPACE secrets
    return math.log2(SPACE) - math.log2(rank)
