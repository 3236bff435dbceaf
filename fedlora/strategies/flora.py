"""FLoRA (Wang et al., NeurIPS 2024): stack the clients' adapters; supports heterogeneous ranks.

Stacking ``B = [w_1 s_1 B_1 | ... | w_n s_n B_n]`` and ``A = [A_1; ...; A_n]`` gives
``B @ A = sum_i w_i s_i B_i A_i`` exactly, whatever each client's rank. Clients fold the
stacked update into their frozen base weights and start every round from a fresh
adapter. Updates accumulate over rounds; the server sends them as factors while those
are smaller than the dense matrix, then as the dense matrix.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING

from fedlora.config import RunConfig
from fedlora.lora.maths import (
    BASE_DELTA,
    BASE_DELTA_A,
    BASE_DELTA_B,
    compact,
    lora_modules,
    part_of,
    weighted_mean,
)
from fedlora.lora.protocol import ClientProtocol
from fedlora.strategies.base import LoraAggregation
from fedlora.strategies.registry import register

if TYPE_CHECKING:
    from fedlora.lora.adapters import AdapterState

__all__ = ["FLoRA", "build_flora"]


class FLoRA(LoraAggregation):
    """Stacking aggregation: the exact sum of weighted client updates, kept as base-weight deltas."""

    def combine(
        self, states: Sequence[AdapterState], weights: Sequence[float], current: AdapterState
    ) -> AdapterState:
        """Head averaged; every module's accumulated update extended by this round's stack."""
        import torch  # noqa: PLC0415 - heavy: the strategy registry needs no torch to list this one

        total = float(sum(weights))
        heads = [k for k in states[0] if part_of(k) == "head"]
        out: AdapterState = OrderedDict(weighted_mean(states, weights, heads))
        for m in lora_modules(states[0]):
            # (d_out, sum r_i) and (sum r_i, d_in): each client's own rank and scale.
            b = torch.cat(
                [
                    (w / total)
                    * (self.alpha / s[m + ".lora_A.weight"].shape[0])
                    * s[m + ".lora_B.weight"].double()
                    for s, w in zip(states, weights, strict=True)
                ],
                dim=1,
            )
            a = torch.cat([s[m + ".lora_A.weight"].double() for s in states], dim=0)
            if BASE_DELTA + m in current:  # already dense: add the product
                out[BASE_DELTA + m] = (current[BASE_DELTA + m].double() + b @ a).float()
                continue
            if BASE_DELTA_B + m in current:
                b = torch.cat([current[BASE_DELTA_B + m].double(), b], dim=1)
                a = torch.cat([current[BASE_DELTA_A + m].double(), a], dim=0)
            form, tensors = compact(b, a)
            if form == "dense":
                out[BASE_DELTA + m] = tensors[0].float()
            else:
                out[BASE_DELTA_B + m], out[BASE_DELTA_A + m] = (t.float() for t in tensors)
        return out


@register(
    "flora",
    family="lora",
    protocol=ClientProtocol(fresh=True, heterogeneous_ranks=True, base_update=True),
    paper="Wang et al., NeurIPS 2024",
    exact=True,
    description=(
        "stacks `[w_i s_i B_i]` and `[A_i]`: the exact sum, folded into the base weights; clients start "
        "each round from a fresh adapter"
    ),
    summary="stack client adapters (any ranks) into an exact update folded into the base; fresh adapters",
)
def build_flora(cfg: RunConfig) -> FLoRA:
    """FLoRA's server."""
    return FLoRA(cfg)
