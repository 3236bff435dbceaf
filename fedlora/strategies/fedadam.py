"""FedAdam (Reddi et al., ICLR 2021): an Adam step on the server with the mean adapter delta."""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import FedAdam

from fedlora.config import RunConfig
from fedlora.strategies.base import flower_kwargs
from fedlora.strategies.registry import register

__all__ = ["build_fedadam", "legacy_fedadam"]


def _eta(cfg: RunConfig) -> float:
    # 0 means the strategy's default server learning rate.
    return cfg.federation.server_learning_rate or 0.01


def legacy_fedadam(cfg: RunConfig) -> tuple[str, dict[str, Any]]:
    """The SecAgg+ counterpart: Flower's legacy FedAdam, with the Message-API class's ``tau``.

    The legacy class defaults to ``tau=1e-9``; the Message-API one to 1e-3.
    """
    return "FedAdam", {"eta": _eta(cfg), "tau": 1e-3}


@register(
    "fedadam",
    paper="Reddi et al., ICLR 2021",
    legacy=legacy_fedadam,
    description="Flower's FedAdam: an Adam step with the mean delta (`server-learning-rate`, default 0.01)",
    summary="server Adam on the mean adapter delta (server-learning-rate, default 0.01)",
)
def build_fedadam(cfg: RunConfig) -> FedAdam:
    """Flower's FedAdam with ``eta = server-learning-rate`` (0 means 0.01)."""
    return FedAdam(**flower_kwargs(cfg), eta=_eta(cfg))
