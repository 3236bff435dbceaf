"""FedYogi (Reddi et al., ICLR 2021): a Yogi step on the server with the mean adapter delta."""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import FedYogi

from fedlora.config import RunConfig
from fedlora.strategies.base import flower_kwargs
from fedlora.strategies.registry import register

__all__ = ["build_fedyogi", "legacy_fedyogi"]


def _eta(cfg: RunConfig) -> float:
    # 0 means the strategy's default server learning rate.
    return cfg.federation.server_learning_rate or 0.01


def legacy_fedyogi(cfg: RunConfig) -> tuple[str, dict[str, Any]]:
    """The SecAgg+ counterpart: Flower's legacy FedYogi, with the Message-API class's ``tau``.

    The legacy class defaults to ``tau=1e-9``; the Message-API one to 1e-3.
    """
    return "FedYogi", {"eta": _eta(cfg), "tau": 1e-3}


@register(
    "fedyogi",
    paper="Reddi et al., ICLR 2021",
    legacy=legacy_fedyogi,
    description="Flower's FedYogi (`server-learning-rate`, default 0.01)",
    summary="server Yogi on the mean adapter delta (server-learning-rate, default 0.01)",
)
def build_fedyogi(cfg: RunConfig) -> FedYogi:
    """Flower's FedYogi with ``eta = server-learning-rate`` (0 means 0.01)."""
    return FedYogi(**flower_kwargs(cfg), eta=_eta(cfg))
