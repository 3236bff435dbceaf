"""Ditto (Li et al., ICML 2021): a personal adapter regularised toward the global one.

The personal adapter ``v`` persists across rounds and is trained on local data with
``loss + lambda/2 ||v - w_global||^2`` (``ditto-lambda``); it predicts alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedlora.adapters import adapter_state, load_adapter_state, proximal_term
from fedlora.models import PERSONAL
from fedlora.personalization.base import Personalization, register
from fedlora.personalize import evaluate_adapter, train_adapter

if TYPE_CHECKING:
    from fedlora.adapters import AdapterState
    from fedlora.config import TrainConfig
    from fedlora.models import LoadedModel
    from fedlora.protocol import ClientView
    from fedlora.train import EvalResult, Tokenized, TrainResult

__all__ = ["Ditto"]


@register
class Ditto(Personalization):
    """Personalized = a persistent personal adapter, pulled toward the global one."""

    name = "ditto"
    paper = "Li et al., ICML 2021"
    summary = "persistent personal adapter trained with lambda/2 ||v - w_global||^2 (ditto-lambda)"

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
        """Train the personal adapter (first round: a copy of the global one) with Ditto's regulariser."""
        load_adapter_state(loaded.model, PERSONAL, stored if stored is not None else view.global_state)
        if not cfg.personal_steps:
            return adapter_state(loaded.model, PERSONAL), None
        from fedlora.adapters import activate

        activate(loaded.model, [PERSONAL], trainable=[PERSONAL])
        pull = proximal_term(loaded.model, PERSONAL, view.global_state, cfg.ditto_lambda)
        result = train_adapter(
            loaded, train, [PERSONAL], cfg.personal_steps, cfg, seed=seed, regularizer=pull
        )
        return adapter_state(loaded.model, PERSONAL), result

    def evaluate(
        self, loaded: LoadedModel, test: Tokenized, view: ClientView, stored: AdapterState | None
    ) -> EvalResult:
        """The personal adapter's metrics."""
        return evaluate_adapter(loaded, test, stored if stored is not None else view.global_state, PERSONAL)
