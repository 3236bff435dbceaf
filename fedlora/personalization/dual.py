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

from fedlora.lora.adapters import activate, adapter_state, load_adapter_state
from fedlora.lora.maths import part_of
from fedlora.models import GLOBAL, PERSONAL
from fedlora.personalization.base import Local, Personalization, register
from fedlora.train.local import train_adapter

if TYPE_CHECKING:
    from fedlora.lora.adapters import AdapterState
    from fedlora.models import LoadedModel
    from fedlora.train import TrainResult

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
    paper = "FedDPA (Yang et al., NeurIPS 2024)"
    summary = "persistent personal adapter trained on top of the frozen global one; both deltas summed"
    keeps = (
        "a personal LoRA adapter + head offset, trained for `personal-steps` on top of the frozen global "
        "adapter, kept across rounds"
    )
    prediction = "global + personal LoRA deltas summed, global head + personal offset"

    def update(
        self, local: Local, stored: AdapterState | None
    ) -> tuple[AdapterState | None, TrainResult | None]:
        """Train the personal adapter on top of the frozen global one; store its head as an offset."""
        glob, model = local.view.global_state, local.loaded.model
        stored = stored if stored is not None else initial_personal(local.loaded)
        if not local.cfg.personal_steps:
            return stored, None
        load_adapter_state(model, GLOBAL, glob)
        load_adapter_state(model, PERSONAL, _head_plus(stored, glob, +1.0))
        result = train_adapter(
            local.loaded,
            local.train,
            [GLOBAL, PERSONAL],
            local.cfg.personal_steps,
            local.cfg,
            seed=local.seed,
            dp=local.dp,
            progress=local.progress,
        )
        return _head_plus(adapter_state(model, PERSONAL), glob, -1.0), result

    def prepare(self, local: Local, stored: AdapterState | None) -> None:
        """Both adapters together, with the personal head."""
        glob, model = local.view.global_state, local.loaded.model
        stored = stored if stored is not None else initial_personal(local.loaded)
        load_adapter_state(model, GLOBAL, glob)
        load_adapter_state(model, PERSONAL, _head_plus(stored, glob, +1.0))
        activate(model, [GLOBAL, PERSONAL], trainable=[])
