"""Ditto (Li et al., ICML 2021): a personal adapter regularised toward the global one.

The personal adapter ``v`` persists across rounds and is trained on local data with
``loss + lambda/2 ||v - w_global||^2`` (``ditto-lambda``); it predicts alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedlora.lora.adapters import activate, adapter_state, load_adapter_state, proximal_term
from fedlora.models import PERSONAL
from fedlora.personalization.base import Local, Personalization, register
from fedlora.train.local import train_adapter, use_adapter

if TYPE_CHECKING:
    from fedlora.lora.adapters import AdapterState
    from fedlora.train import TrainResult

__all__ = ["Ditto"]


@register
class Ditto(Personalization):
    """Personalized = a persistent personal adapter, pulled toward the global one."""

    name = "ditto"
    paper = "Ditto (Li et al., ICML 2021)"
    summary = "persistent personal adapter trained with lambda/2 ||v - w_global||^2 (ditto-lambda)"
    keeps = "a personal adapter trained with `loss + ditto-lambda/2 * ||v - w_global||^2`, kept across rounds"
    prediction = "the personal adapter alone"
    regularized = True

    def update(
        self, local: Local, stored: AdapterState | None
    ) -> tuple[AdapterState | None, TrainResult | None]:
        """Train the personal adapter (first round: a copy of the global one) with Ditto's regulariser."""
        model, cfg = local.loaded.model, local.cfg
        load_adapter_state(model, PERSONAL, stored if stored is not None else local.view.global_state)
        if not cfg.personal_steps:
            return adapter_state(model, PERSONAL), None
        activate(model, [PERSONAL], trainable=[PERSONAL])
        pull = proximal_term(model, PERSONAL, local.view.global_state, cfg.ditto_lambda)
        result = train_adapter(
            local.loaded,
            local.train,
            [PERSONAL],
            cfg.personal_steps,
            cfg,
            seed=local.seed,
            regularizer=pull,
            progress=local.progress,
        )
        return adapter_state(model, PERSONAL), result

    def prepare(self, local: Local, stored: AdapterState | None) -> None:
        """The personal adapter."""
        state = stored if stored is not None else local.view.global_state
        use_adapter(local.loaded, state, PERSONAL)
