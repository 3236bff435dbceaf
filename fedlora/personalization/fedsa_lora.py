"""FedSA-LoRA personalization (Guo et al., ICLR 2025): the global A with the client's own B.

Goes with the ``fedsa-lora`` strategy, under which every client trains A and B, sends A,
and keeps B; no extra personal training happens here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedlora.personalization.base import Local, Personalization, register
from fedlora.train.local import use_adapter

if TYPE_CHECKING:
    from fedlora.config import TrainConfig
    from fedlora.lora.adapters import AdapterState

__all__ = ["FedSALoRA"]


@register
class FedSALoRA(Personalization):
    """Personalized = global A and head with the B this client kept from its own training.

    Nothing beyond the shared round is trained: B was trained and kept then.
    """

    name = "fedsa-lora"
    paper = "FedSA-LoRA (Guo et al., ICLR 2025)"
    summary = "global A and head with the client's own B (strategy fedsa-lora)"
    keeps = "its LoRA B matrices (trained with A during the shared round)"
    prediction = "global A and head with the client's own B"
    strategy = "fedsa-lora"

    def same_as_global(self, cfg: TrainConfig) -> bool:
        """Never: the client's own B differs from the global one even without personal steps."""
        return False

    def prepare(self, local: Local, stored: AdapterState | None) -> None:
        """The client's own variant (global A, own B)."""
        use_adapter(local.loaded, local.view.own_state)
