"""FlexLoRA (Bai et al., NeurIPS 2024): heterogeneous ranks through an SVD of the mean update.

The server forms the example-weighted mean of the clients' full updates
``sum_i w_i s_i B_i A_i`` per module, and keeps its best rank-R factors (R: the largest
client rank). A client of rank ``r`` takes the leading ``r`` directions, the best rank-r
approximation of the mean update, and trains from there. Not exact when the mean update
has rank above a client's ``r``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING

from fedlora.config import RunConfig
from fedlora.lora.maths import part_of, products, svd_factors, weighted_mean
from fedlora.lora.protocol import ClientProtocol
from fedlora.strategies.base import LoraAggregation
from fedlora.strategies.registry import register

if TYPE_CHECKING:
    from fedlora.lora.adapters import AdapterState

__all__ = ["FlexLoRA", "build_flexlora"]


class FlexLoRA(LoraAggregation):
    """Mean full-rank update per module, sent as its truncated-SVD factors."""

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        self.rank = max(cfg.model.ranks())

    def combine(
        self, states: Sequence[AdapterState], weights: Sequence[float], current: AdapterState
    ) -> AdapterState:
        """Head averaged; A and B replaced by rank-R factors of the mean update."""
        heads = [k for k in states[0] if part_of(k) == "head"]
        out: AdapterState = OrderedDict(weighted_mean(states, weights, heads))
        per_client = [products(s, self.alpha) for s in states]
        mean = weighted_mean(per_client, weights, list(per_client[0]))  # (d_out, d_in) per module
        for m, delta in mean.items():
            b, a = svd_factors(delta, self.rank)
            out[m + ".lora_A.weight"], out[m + ".lora_B.weight"] = a, b
        return out


@register(
    "flexlora",
    family="lora",
    protocol=ClientProtocol(factored=True, heterogeneous_ranks=True),
    paper="Bai et al., NeurIPS 2024",
    description=(
        "the mean full update `sum w_i s_i B_i A_i`, sent as its truncated SVD; a client of rank r keeps "
        "the best rank-r part"
    ),
    exact_note="truncated",
    summary="mean of the clients' full updates, truncated by SVD to each client's rank (any ranks)",
)
def build_flexlora(cfg: RunConfig) -> FlexLoRA:
    """FlexLoRA's server."""
    return FlexLoRA(cfg)
