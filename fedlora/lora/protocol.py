"""What a client trains, sends and keeps under a strategy, and how it reads the server's message.

Every strategy declares a `ClientProtocol`. The client turns the server's arrays into a
`ClientView` (the global adapter at the client's own rank, the client's own variant of
it, and the update folded into the frozen base weights), trains, and sends back only the
parts the protocol names. Nothing else about a strategy needs client code.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fedlora.lora.maths import lora_modules, part_of

if TYPE_CHECKING:
    import torch

    from fedlora.lora.adapters import AdapterState
from fedlora.lora.maths import base_deltas

__all__ = ["ClientProtocol", "ClientView", "receive", "sent_parts"]

PARTS = ("lora_A", "lora_B", "head")


@dataclass(frozen=True)
class ClientProtocol:
    """The client's side of a strategy.

    Attributes
    ----------
    sent : frozenset[str]
        Adapter parts (``lora_A``, ``lora_B``, ``head``) the client uploads.
    frozen : frozenset[str]
        Parts never trained: they stay at the shared seeded init (FFA-LoRA freezes A).
    kept : frozenset[str]
        Parts trained and kept on the client between rounds, never sent (FedSA-LoRA: B).
    fresh : bool
        Start every round from the initial adapter; the aggregated update arrives folded
        into the base weights (FLoRA).
    factored : bool
        The received A and B are factors of the global update, ``B @ A`` unscaled, of a
        rank at least the client's; the client keeps its leading ``r`` directions (FlexLoRA).
    heterogeneous_ranks : bool
        Clients may use different LoRA ranks.
    base_update : bool
        The server's arrays also carry ``base-delta`` updates that clients add to their
        frozen base weights (FedEx-LoRA, FLoRA): the base must be a dense, unquantized one.
    proximal : bool
        Add FedProx's proximal term ``mu/2 ||w - w_global||^2`` to the local loss.

    """

    sent: frozenset[str] = frozenset(PARTS)
    frozen: frozenset[str] = frozenset()
    kept: frozenset[str] = frozenset()
    fresh: bool = False
    factored: bool = False
    heterogeneous_ranks: bool = False
    base_update: bool = False
    proximal: bool = False

    def __post_init__(self) -> None:
        for name in ("sent", "frozen", "kept"):
            unknown = set(getattr(self, name)) - set(PARTS)
            if unknown:
                raise ValueError(f"ClientProtocol.{name}: unknown parts {sorted(unknown)}")


@dataclass
class ClientView:
    """A client's reading of the server's message, at the client's own LoRA rank.

    ``global_state`` is the federation's adapter (missing parts from the seeded init);
    ``own_state`` is what this client trains and predicts with when the strategy keeps
    parts locally (otherwise the same as ``global_state``); ``base_delta`` maps module
    names to updates (d_out, d_in) that belong in the frozen base weights.
    """

    global_state: AdapterState
    own_state: AdapterState
    base_delta: dict[str, torch.Tensor] = field(default_factory=dict)


def sent_parts(protocol: ClientProtocol, state: Mapping[str, torch.Tensor]) -> AdapterState:
    """The tensors of ``state`` that the protocol uploads, in order."""
    return OrderedDict((k, v) for k, v in state.items() if part_of(k) in protocol.sent)


def _from_factors(
    received: Mapping[str, torch.Tensor], initial: Mapping[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    # FlexLoRA: keep the leading r directions of the global update's factors, then undo
    # LoRA's alpha/r scaling so that (alpha/r) * B @ A is the rank-r truncation.
    out: dict[str, torch.Tensor] = {}
    for m in lora_modules(received):
        fa, fb = received[m + ".lora_A.weight"], received[m + ".lora_B.weight"]  # (R, d_in), (d_out, R)
        init_a = initial[m + ".lora_A.weight"]  # (r, d_in)
        r = init_a.shape[0]
        root = math.sqrt(alpha / r)
        a, b = fa[:r].clone() / root, fb[:, :r].clone() / root
        if a.shape[0] < r:  # the server's factors have fewer directions than this client
            a = init_a.clone().index_copy_(0, _arange(a.shape[0]), a)
            b = b.new_zeros(b.shape[0], r).index_copy_(1, _arange(b.shape[1]), b)
        # Directions with no singular value would leave A and B both zero, where neither gets
        # a gradient: restart them from the seeded init (B stays zero, the product unchanged).
        dead = (a.norm(dim=1) == 0) & (b.norm(dim=0) == 0)
        a[dead] = init_a[dead]
        out[m + ".lora_A.weight"], out[m + ".lora_B.weight"] = a, b
    return out


def _arange(n: int) -> torch.Tensor:
    import torch  # noqa: PLC0415 - heavy: torch

    return torch.arange(n)


def receive(
    protocol: ClientProtocol,
    received: Mapping[str, torch.Tensor],
    initial: Mapping[str, torch.Tensor],
    kept: Mapping[str, torch.Tensor] | None,
    *,
    alpha: float,
) -> ClientView:
    """Build the client's view of the server's arrays.

    Parameters
    ----------
    protocol : ClientProtocol
        The strategy's client side.
    received : Mapping[str, torch.Tensor]
        The server's arrays: adapter keys and ``base-delta`` keys.
    initial : Mapping[str, torch.Tensor]
        The seeded initial adapter at this client's rank (fills every missing part).
    kept : Mapping[str, torch.Tensor] or None
        The parts this client kept from its last round (`ClientProtocol.kept`), if any.
    alpha : float
        LoRA alpha, to rescale factored updates to this client's rank.

    """
    adapter = {k: v for k, v in received.items() if part_of(k) != "base-delta"}
    if protocol.factored:
        adapter = {**adapter, **_from_factors(adapter, initial, alpha)}
    global_state: AdapterState = OrderedDict(
        (k, adapter[k].clone() if k in adapter and part_of(k) not in protocol.frozen else v.clone())
        for k, v in initial.items()
    )
    own = OrderedDict(global_state)
    if kept:
        own.update({k: v.clone() for k, v in kept.items() if k in own and part_of(k) in protocol.kept})
    return ClientView(global_state, own, base_deltas(received))
