"""Dual adapters in the spirit of FedDPA (Yang et al., NeurIPS 2024): global + personal, summed.

The shared (``global``) adapter is trained alone and sent; after each round, the personal
adapter is trained further on top of the new, frozen global one and never leaves the
client. Personalized predictions sum both LoRA deltas and use the personal task head.

The personal head is stored as an offset from the global head, so that it follows the
federation's head as that improves instead of going stale.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

from fedlora.adapters import activate, adapter_state, load_adapter_state
from fedlora.lora_math import part_of
from fedlora.models import GLOBAL, PERSONAL
from fedlora.personalization.base import Personalization, register
from fedlora.personalize import train_adapter
from fedlora.train import evaluate

if TYPE_CHECKING:
    from fedlora.adapters import AdapterState
    from fedlora.config import TrainConfig
    from fedlora.models import LoadedModel
    from fedlora.protocol import ClientView
    from fedlora.train import EvalResult, Tokenized, TrainResult

__all__ = ["Dual", "initial_personal"]


def initial_personal(loaded: LoadedModel) -> AdapterState:
    """The stored personal adapter on a client's first round: fixed LoRA init, zero head offset."""
    return OrderedDict(
        (k, v.clone() if part_of(k) != "head" else v.new_zeros(v.shape))
        for k, v in loaded.initial_personal.items()
    )


def _head_plus(stored: AdapterState, global_state: AdapterState, sign: float) -> AdapterState:
    # Head tensors: usable = global + offset (sign=+1); offset = usable - global (sign=-1).
    return OrderedDict(
        (k, v + sign * global_state[k] if part_of(k) == "head" else v) for k, v in stored.items()
    )


@register
class Dual(Personalization):
    """Personalized = global LoRA + personal LoRA, with the personal head."""

    name = "dual"
    paper = "FedDPA: Yang et al., NeurIPS 2024"
    summary = "persistent personal adapter trained on top of the frozen global one; both deltas summed"

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
        """Train the personal adapter on top of the frozen global one; store its head as an offset."""
        stored = stored if stored is not None else initial_personal(loaded)
        if not cfg.personal_steps:
            return stored, None
        load_adapter_state(loaded.model, GLOBAL, view.global_state)
        load_adapter_state(loaded.model, PERSONAL, _head_plus(stored, view.global_state, +1.0))
        result = train_adapter(loaded, train, [GLOBAL, PERSONAL], cfg.personal_steps, cfg, seed=seed)
        return _head_plus(adapter_state(loaded.model, PERSONAL), view.global_state, -1.0), result

    def evaluate(
        self, loaded: LoadedModel, test: Tokenized, view: ClientView, stored: AdapterState | None
    ) -> EvalResult:
        """Metrics of both adapters together."""
        stored = stored if stored is not None else initial_personal(loaded)
        load_adapter_state(loaded.model, GLOBAL, view.global_state)
        load_adapter_state(loaded.model, PERSONAL, _head_plus(stored, view.global_state, +1.0))
        activate(loaded.model, [GLOBAL, PERSONAL], trainable=[])
        return evaluate(loaded.model, test)
