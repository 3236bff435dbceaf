"""FedProx (Li et al., MLSys 2020): FedAvg whose clients add a proximal term to their loss."""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import FedProx

from fedlora.config import RunConfig
from fedlora.lora.protocol import ClientProtocol
from fedlora.strategies.base import flower_kwargs
from fedlora.strategies.registry import register

__all__ = ["build_fedprox", "legacy_fedprox"]


def legacy_fedprox(cfg: RunConfig) -> tuple[str, dict[str, Any]]:
    """The SecAgg+ counterpart: Flower's legacy FedProx with the same ``proximal-mu``."""
    return "FedProx", {"proximal_mu": cfg.federation.proximal_mu}


@register(
    "fedprox",
    protocol=ClientProtocol(proximal=True),
    paper="Li et al., MLSys 2020",
    plain_mean=True,
    legacy=legacy_fedprox,
    description="FedAvg; sends `proximal-mu`, clients add `mu/2 ||w - w_global||^2`",
    summary="FedAvg; clients add (mu/2)||w - w_global||^2 over the shared adapter (proximal-mu)",
)
def build_fedprox(cfg: RunConfig) -> FedProx:
    """Flower's FedProx: sends ``proximal-mu`` in every training message."""
    return FedProx(**flower_kwargs(cfg), proximal_mu=cfg.federation.proximal_mu)
