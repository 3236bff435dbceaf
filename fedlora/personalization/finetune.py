"""Fine-tuning: each round, a personal copy of the new global adapter is trained on local data.

The classic FedAvg + local fine-tuning baseline (e.g. Wang et al., arXiv:1910.10252, 2019):
the copy restarts from the global adapter every round, so nothing carries over.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedlora.adapters import adapter_state, load_adapter_state
from fedlora.models import PERSONAL
from fedlora.personalization.base import Personalization, register
from fedlora.personalize import evaluate_adapter, train_adapter

if TYPE_CHECKING:
    from fedlora.adapters import AdapterState
    from fedlora.config import TrainConfig
    from fedlora.models import LoadedModel
    from fedlora.protocol import ClientView
    from fedlora.train import EvalResult, Tokenized, TrainResult

__all__ = ["FineTune"]


@register
class FineTune(Personalization):
    """Personalized = the global adapter after ``personal-steps`` of local training."""

    name = "finetune"
    paper = "Wang et al., arXiv:1910.10252, 2019"
    summary = "copy the new global adapter and fine-tune it locally each round"

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
        """Fine-tune a copy of the global adapter."""
        load_adapter_state(loaded.model, PERSONAL, view.global_state)
        if not cfg.personal_steps:
            return adapter_state(loaded.model, PERSONAL), None
        result = train_adapter(loaded, train, [PERSONAL], cfg.personal_steps, cfg, seed=seed)
        return adapter_state(loaded.model, PERSONAL), result

    def evaluate(
        self, loaded: LoadedModel, test: Tokenized, view: ClientView, stored: AdapterState | None
    ) -> EvalResult:
        """The fine-tuned copy's metrics."""
        return evaluate_adapter(loaded, test, stored if stored is not None else view.global_state, PERSONAL)
