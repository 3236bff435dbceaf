"""FFA-LoRA (Sun et al., ICLR 2024): A frozen at a shared random init, only B trained and averaged.

With A identical on every client, ``mean(B_i) A = mean(B_i A)``: averaging is exact, and
it halves what travels each way.
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg

from fedlora.config import RunConfig
from fedlora.lora.protocol import ClientProtocol
from fedlora.strategies.base import flower_kwargs, legacy_fedavg
from fedlora.strategies.registry import register

__all__ = ["build_ffa_lora"]


@register(
    "ffa-lora",
    family="lora",
    protocol=ClientProtocol(sent=frozenset({"lora_B", "head"}), frozen=frozenset({"lora_A"})),
    paper="Sun et al., ICLR 2024",
    exact=True,
    plain_mean=True,
    legacy=legacy_fedavg,
    description="FedAvg of B and the head; A stays at its shared seeded init on every client",
    summary="A frozen at the shared seeded init; B and the head are trained and averaged (exact)",
)
def build_ffa_lora(cfg: RunConfig) -> FedAvg:
    """FedAvg over B and the head; A never leaves its seeded init."""
    return FedAvg(**flower_kwargs(cfg))
