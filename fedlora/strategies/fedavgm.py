"""FedAvgM (Hsu et al., 2019): server momentum on the mean adapter delta."""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import FedAvgM

from fedlora.config import RunConfig
from fedlora.strategies.base import flower_kwargs
from fedlora.strategies.registry import register

__all__ = ["build_fedavgm", "legacy_fedavgm"]


def _server_kwargs(cfg: RunConfig) -> dict[str, Any]:
    fed = cfg.federation
    # A server learning rate of 0 means the strategy's default, 1.
    return {"server_learning_rate": fed.server_learning_rate or 1.0, "server_momentum": fed.server_momentum}


def legacy_fedavgm(cfg: RunConfig) -> tuple[str, dict[str, Any]]:
    """The SecAgg+ counterpart: Flower's legacy FedAvgM with the same server momentum."""
    return "FedAvgM", _server_kwargs(cfg)


@register(
    "fedavgm",
    paper="Hsu et al., 2019",
    legacy=legacy_fedavgm,
    description="Flower's FedAvgM: server momentum (`server-momentum`, `server-learning-rate` default 1)",
    summary="server momentum on the mean adapter delta (server-momentum, server-learning-rate default 1)",
)
def build_fedavgm(cfg: RunConfig) -> FedAvgM:
    """Flower's FedAvgM with ``server-momentum`` and ``server-learning-rate`` (0 means 1)."""
    return FedAvgM(**flower_kwargs(cfg), **_server_kwargs(cfg))
