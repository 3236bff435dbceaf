"""Krum (Blanchard et al., NeurIPS 2017): keep the upload closest to its neighbours."""

from __future__ import annotations

from flwr.serverapp.strategy import Krum

from fedlora.config import RunConfig
from fedlora.strategies.base import flower_kwargs
from fedlora.strategies.registry import register

__all__ = ["build_krum"]


@register(
    "krum",
    family="robust",
    paper="Blanchard et al., NeurIPS 2017",
    description="Flower's Krum: the one upload closest to its neighbours (`byzantine-clients`)",
    summary="the one client adapter closest to its n - f - 2 nearest (f = byzantine-clients)",
)
def build_krum(cfg: RunConfig) -> Krum:
    """Flower's Krum with ``num_malicious_nodes = byzantine-clients``."""
    return Krum(**flower_kwargs(cfg), num_malicious_nodes=cfg.federation.byzantine_clients)
