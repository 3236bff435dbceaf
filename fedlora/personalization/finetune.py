"""Fine-tuning: each round, a personal copy of the new global adapter is trained on local data.

The classic FedAvg + local fine-tuning baseline (e.g. Wang et al., arXiv:1910.10252, 2019):
the copy restarts from the global adapter every round, so nothing carries over.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedlora.lora.adapters import adapter_state, load_adapter_state
from fedlora.models import PERSONAL
from fedlora.personalization.base import Local, Personalization, register
from fedlora.train.local import train_adapter, use_adapter

if TYPE_CHECKING:
    from fedlora.lora.adapters import AdapterState
    from fedlora.train import TrainResult

__all__ = ["FineTune"]


@register
class FineTune(Personalization):
    """Personalized = the global adapter after ``personal-steps`` of local training."""

    name = "finetune"
    paper = "FedAvg + local fine-tuning (Wang et al., arXiv:1910.10252)"
    summary = "copy the new global adapter and fine-tune it locally each round"
    keeps = "a copy of the new global adapter, fine-tuned for `personal-steps` (restarted every round)"
    prediction = "the fine-tuned copy"

    def update(
        self, local: Local, stored: AdapterState | None
    ) -> tuple[AdapterState | None, TrainResult | None]:
        """Fine-tune a copy of the global adapter."""
        model = local.loaded.model
        load_adapter_state(model, PERSONAL, local.view.global_state)
        if not local.cfg.personal_steps:
            return adapter_state(model, PERSONAL), None
        result = train_adapter(
            local.loaded,
            local.train,
            [PERSONAL],
            local.cfg.personal_steps,
            local.cfg,
            seed=local.seed,
            dp=local.dp,
            progress=local.progress,
        )
        return adapter_state(model, PERSONAL), result

    def prepare(self, local: Local, stored: AdapterState | None) -> None:
        """The fine-tuned copy."""
        state = stored if stored is not None else local.view.global_state
        use_adapter(local.loaded, state, PERSONAL)
