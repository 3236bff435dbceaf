"""FedAvg over the shared adapter's A, B and head tensors (FedIT: Zhang et al., ICASSP 2024).

Averaging A and B separately is the common baseline; it is not the average of the
updates B_i A_i (see the exactness tests).
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg

from fedlora.config import RunConfig
from fedlora.strategies.base import flower_kwargs, legacy_fedavg
from fedlora.strategies.registry import register

__all__ = ["build_fedavg"]


@register(
    "fedavg",
    paper="FedIT (Zhang et al., ICASSP 2024)",
    plain_mean=True,
    legacy=legacy_fedavg,
    description="Flower's FedAvg: mean of A, of B and of the head",
    summary="average A, B and the head, weighted by training examples",
)
def build_fedavg(cfg: RunConfig) -> FedAvg:
    """Flower's FedAvg, weighted by each client's number of training examples."""
    return FedAvg(**flower_kwargs(cfg))
