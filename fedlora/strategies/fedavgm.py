"""FedAvgM (Hsu et al., 2019): server momentum on the mean adapter delta."""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvgM

from fedlora.config import RunConfig
from fedlora.strategies.base import flower_kwargs
from fedlora.strategies.registry import register

__all__ = ["build_fedavgm"]


@register(
    "fedavgm",
    paper="Hsu et al., arXiv:1909.06335, 2019",
    summary="server momentum on the mean adapter delta (server-momentum, server-learning-rate default 1)",
)
def build_fedavgm(cfg: RunConfig) -> FedAvgM:
    """Flower's FedAvgM with ``server-momentum`` and ``server-learning-rate`` (0 means 1)."""
    fed = cfg.federation
    return FedAvgM(
        **flower_kwargs(cfg),
        server_learning_rate=fed.server_learning_rate or 1.0,
        server_momentum=fed.server_momentum,
    )
