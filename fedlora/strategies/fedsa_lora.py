"""FedSA-LoRA (Guo et al., ICLR 2025): A is shared and averaged, B stays on each client.

The paper finds that A learns general knowledge and B client-specific knowledge; the
personalized model is the global A with the client's own B.
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg

from fedlora.config import RunConfig
from fedlora.lora.protocol import ClientProtocol
from fedlora.strategies.base import flower_kwargs, legacy_fedavg
from fedlora.strategies.registry import register

__all__ = ["build_fedsa_lora"]


@register(
    "fedsa-lora",
    family="lora",
    protocol=ClientProtocol(sent=frozenset({"lora_A", "head"}), kept=frozenset({"lora_B"})),
    paper="Guo et al., ICLR 2025",
    plain_mean=True,
    legacy=legacy_fedavg,
    personalization="fedsa-lora",
    description="FedAvg of A and the head; each client keeps its own B",
    exact_note="B is personal by design",
    summary="A and the head are averaged; each client keeps its own B (personalization fedsa-lora)",
)
def build_fedsa_lora(cfg: RunConfig) -> FedAvg:
    """FedAvg over A and the head; B never leaves the client."""
    return FedAvg(**flower_kwargs(cfg))
