"""No personalization: every client predicts with the global adapter (the FedAvg baseline)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedlora.personalization.base import Personalization, register
from fedlora.personalize import evaluate_adapter

if TYPE_CHECKING:
    from fedlora.adapters import AdapterState
    from fedlora.config import TrainConfig
    from fedlora.models import LoadedModel
    from fedlora.protocol import ClientView
    from fedlora.train import EvalResult, Tokenized, TrainResult

__all__ = ["NoPersonalization"]


@register
class NoPersonalization(Personalization):
    """Personalized = global: nothing is kept, nothing extra is trained."""

    name = "none"
    summary = "predict with the global adapter; nothing kept"

    def update(
        self,
        loaded: LoadedModel,
        train: Tokenized,
        view: ClientView,
        stored: AdapterState | None,
        cfg: TrainConfig,
        *,
        seed: int,
    ) -> tuple[AdapterState | None, TrainResult | None]:
        """Nothing to train."""
        return None, None

    def evaluate(
        self, loaded: LoadedModel, test: Tokenized, view: ClientView, stored: AdapterState | None
    ) -> EvalResult:
        """The global adapter's metrics."""
        return evaluate_adapter(loaded, test, view.global_state)
