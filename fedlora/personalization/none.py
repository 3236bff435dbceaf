"""No personalization: every client predicts with the global adapter (the FedAvg baseline)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedlora.personalization.base import Local, Personalization, register
from fedlora.train.local import use_adapter

if TYPE_CHECKING:
    from fedlora.config import TrainConfig
    from fedlora.lora.adapters import AdapterState

__all__ = ["NoPersonalization"]


@register
class NoPersonalization(Personalization):
    """Personalized = global: nothing is kept, nothing extra is trained."""

    name = "none"
    paper = ""
    summary = "predict with the global adapter; nothing kept"
    keeps = "nothing"
    prediction = "the global adapter"

    def same_as_global(self, cfg: TrainConfig) -> bool:
        """Always: it predicts with the global adapter."""
        return True

    def prepare(self, local: Local, stored: AdapterState | None) -> None:
        """The global adapter alone."""
        use_adapter(local.loaded, local.view.global_state)
