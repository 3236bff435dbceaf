"""Trimmed mean (Yin et al., ICML 2018): drop the extremes of every coordinate, average the rest."""

from __future__ import annotations

from flwr.serverapp.strategy import FedTrimmedAvg

from fedlora.config import RunConfig
from fedlora.strategies.base import flower_kwargs
from fedlora.strategies.registry import register

__all__ = ["build_trimmed_mean"]


@register(
    "trimmed-mean",
    family="robust",
    paper="Yin et al., ICML 2018",
    description="Flower's FedTrimmedAvg: per coordinate, drop `trim-fraction` from each end",
    summary="per coordinate, drop the trim-fraction lowest and highest values and average the rest",
)
def build_trimmed_mean(cfg: RunConfig) -> FedTrimmedAvg:
    """Flower's FedTrimmedAvg with ``beta = trim-fraction``."""
    return FedTrimmedAvg(**flower_kwargs(cfg), beta=cfg.federation.trim_fraction)
