"""FedYogi (Reddi et al., ICLR 2021): a Yogi step on the server with the mean adapter delta."""

from __future__ import annotations

from flwr.serverapp.strategy import FedYogi

from fedlora.config import RunConfig
from fedlora.strategies.base import flower_kwargs
from fedlora.strategies.registry import register

__all__ = ["build_fedyogi"]


@register(
    "fedyogi",
    paper="Adaptive Federated Optimization: Reddi et al., ICLR 2021",
    summary="server Yogi on the mean adapter delta (server-learning-rate, default 0.01)",
)
def build_fedyogi(cfg: RunConfig) -> FedYogi:
    """Flower's FedYogi with ``eta = server-learning-rate`` (0 means 0.01)."""
    return FedYogi(**flower_kwargs(cfg), eta=cfg.federation.server_learning_rate or 0.01)
