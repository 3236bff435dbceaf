"""FedEx-LoRA (Singhal et al., ACL 2025): exact aggregation by folding a residual into the base.

The server averages A and B as FedAvg does and also computes, per adapted module,
``residual = mean(s B_i A_i) - s mean(B) mean(A)`` (``s = alpha / r``). Clients add the
accumulated residual to their frozen base weights, so the effective weight is
``W0 + residuals + s mean(B) mean(A)``: exactly the example-weighted mean of the clients'
updates. The price is one dense (d_out, d_in) matrix per module sent down each round,
which the bytes-down figures include.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING

from fedlora.config import RunConfig
from fedlora.lora.maths import BASE_DELTA, base_deltas, part_of, products, weighted_mean
from fedlora.lora.protocol import ClientProtocol
from fedlora.strategies.base import LoraAggregation
from fedlora.strategies.registry import register

if TYPE_CHECKING:
    from fedlora.lora.adapters import AdapterState

__all__ = ["FedExLoRA", "build_fedex_lora"]


class FedExLoRA(LoraAggregation):
    """FedAvg of A, B and the head, plus the exact residual for the base weights."""

    def combine(
        self, states: Sequence[AdapterState], weights: Sequence[float], current: AdapterState
    ) -> AdapterState:
        """Mean adapter, and ``base-delta`` = previous residual + this round's residual."""
        adapter_keys = [k for k in states[0] if part_of(k) != "base-delta"]
        mean = weighted_mean(states, weights, adapter_keys)
        per_client = [products(s, self.alpha) for s in states]
        exact = weighted_mean(per_client, weights, list(per_client[0]))  # mean(s B_i A_i), (d_out, d_in)
        of_means = products(mean, self.alpha)  # s mean(B) mean(A)
        previous = base_deltas(current)
        out: AdapterState = OrderedDict(mean)
        for m, target in exact.items():
            residual = target.double() - of_means[m]
            out[BASE_DELTA + m] = (previous.get(m, 0) + residual).float()
        return out


@register(
    "fedex-lora",
    family="lora",
    protocol=ClientProtocol(base_update=True),
    paper="Singhal et al., ACL 2025",
    exact=True,
    description=(
        "FedAvg of A and B, plus the residual `mean(s B_i A_i) - s mean(B) mean(A)` that every client adds "
        "to its frozen base weights"
    ),
    summary="FedAvg of A and B plus the residual mean(BA) - mean(B)mean(A) folded into the base (exact)",
)
def build_fedex_lora(cfg: RunConfig) -> FedExLoRA:
    """FedEx-LoRA's server."""
    return FedExLoRA(cfg)
