"""Secure aggregation with Flower's SecAgg+ (Bell et al., CCS 2020) on the legacy workflow path.

Each sampled client masks its upload with pairwise and self masks (secret-shared among
its neighbours), after clipping every value to ``+-secagg-clipping-range`` and
quantizing it; the server adds the masked vectors and removes the masks, and so learns
only the example-weighted sum of the uploads. In Flower 1.42 this works only through
``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))`` with a legacy strategy, so each
strategy whose server needs nothing but that sum has a legacy counterpart here, with the
same hyperparameters as its Message-API builder (`StrategyInfo.legacy`, declared in the
strategy's own module). The server's side of such a run is `fedlora.server.secure`.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "NUM_SHARES",
    "QUANTIZATION_LEVELS",
    "RECONSTRUCTION_THRESHOLD",
    "SECURE_EVENT",
    "quantization_bound",
]

# Event written to metrics.jsonl for every securely aggregated round.
SECURE_EVENT = "secure-aggregate"
# SecAgg+ neighbourhoods: each client's masks are shared with half of the sampled clients,
# and 70% of a neighbourhood can reconstruct a dropped client's mask.
NUM_SHARES, RECONSTRUCTION_THRESHOLD = 0.5, 0.7
# Flower's default quantization range: values in [-c, c] map to 2**22 integer levels.
QUANTIZATION_LEVELS = 2**22


def quantization_bound(weights: Sequence[float], clipping_range: float, max_weight: float) -> float:
    """Largest difference between the secure and the exact weighted mean, per value.

    Each client quantizes ``value * w_i / max_weight`` with step ``2c / (levels - 1)``
    (rounding error at most one step); the server divides the sum by ``sum(w_i) / max_weight``.
    """
    step = 2 * clipping_range / (QUANTIZATION_LEVELS - 1)
    return len(weights) * step * max_weight / sum(weights)
