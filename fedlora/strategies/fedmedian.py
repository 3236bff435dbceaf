"""FedMedian (Yin et al., ICML 2018): coordinate-wise median of the uploaded adapters."""

from __future__ import annotations

from flwr.serverapp.strategy import FedMedian

from fedlora.config import RunConfig
from fedlora.strategies.base import flower_kwargs
from fedlora.strategies.registry import register

__all__ = ["build_fedmedian"]


@register(
    "fedmedian",
    family="robust",
    paper="Yin et al., ICML 2018",
    description="Flower's FedMedian: coordinate-wise median",
    summary="coordinate-wise median of A, B and the head (robust to a minority of bad clients)",
)
def build_fedmedian(cfg: RunConfig) -> FedMedian:
    """Flower's FedMedian."""
    return FedMedian(**flower_kwargs(cfg))
