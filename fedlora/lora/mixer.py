"""An adaptive mixer of two LoRA adapters: per layer, a softmax gate on the layer's input, per token.

FedALT (Bian et al., AAAI 2026, arXiv:2503.11880) mixes a client's individual LoRA with a
frozen Rest-of-World LoRA the way a mixture of experts mixes its experts. Inside `mixed`,
every LoRA layer that carries both adapters computes, for each row ``x`` of its input (a
token of a sequence; a pooled vector for a classifier's pooler)::

    W0 x + g_0(x) s B_0 A_0 x + g_1(x) s B_1 A_1 x,      (g_0, g_1)(x) = softmax(G x)

where ``G`` (2, d_in) is that layer's gate, without bias. A forward pre-hook on the layer
computes ``g`` from its input; a forward hook on each adapter's ``lora_B`` scales that
adapter's output. The gates are attached to their layers as ``Linear`` modules only while
inside, so that the training loop's optimizer (and DP-SGD's per-example gradients) see
them; on exit they are detached and every hook is removed, so the model computes as
before. A gate's module name has no ``lora_``: PEFT's adapter state dicts never hold it.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fedlora.core.errors import FedloraError

if TYPE_CHECKING:
    import torch
    from peft import PeftModel

    from fedlora.lora.adapters import AdapterState

__all__ = ["GATE_PREFIX", "Mixer", "initial_gates", "is_gate", "mixed"]

GATE_PREFIX = "mixer-gate::"  # a gate's key in a stored state: "mixer-gate::<layer name>"
_GATE_MODULE = "mixer_gate"  # the gate's name inside its layer while mixing


def is_gate(key: str) -> bool:
    """Whether a stored key is a mixer gate's (not an adapter tensor)."""
    return key.startswith(GATE_PREFIX)


def _mixed_layers(model: PeftModel, adapters: tuple[str, str]) -> Iterator[tuple[str, Any]]:
    """``(name, layer)`` of every LoRA layer that carries both adapters, in model order."""
    from peft.tuners.lora import LoraLayer  # noqa: PLC0415 - heavy: peft

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and all(a in module.lora_B for a in adapters):
            if any(a in getattr(module, "lora_variant", {}) for a in adapters):
                raise FedloraError(f"mixer: {name} is not plain LoRA (its delta is not its lora_B output)")
            yield name, module


def initial_gates(model: PeftModel, adapters: tuple[str, str], *, seed: int) -> AdapterState:
    """A seeded (2, d_in) gate per layer carrying both ``adapters``, drawn as ``torch.nn.Linear`` draws.

    ``Linear``'s default is uniform on ``[-1/sqrt(d_in), 1/sqrt(d_in)]``: the two weights
    start near 1/2 each and already differ from input to input.
    """
    import torch  # noqa: PLC0415 - heavy: torch

    generator = torch.Generator().manual_seed(seed)
    gates: AdapterState = OrderedDict()
    for name, layer in _mixed_layers(model, adapters):
        bound = 1.0 / math.sqrt(layer.in_features)
        gates[GATE_PREFIX + name] = (torch.rand(2, layer.in_features, generator=generator) * 2 - 1) * bound
    return gates


@dataclass
class Mixer:
    """The gates of one `mixed` block and what they said on the last forward pass.

    ``gates`` maps a layer's name to its gate; ``weights`` holds, per layer, the last
    forward pass's mixing weights (..., 2), detached (index 0: the first adapter).
    """

    gates: dict[str, torch.nn.Linear]
    weights: dict[str, torch.Tensor] = field(default_factory=dict)

    def parameters(self) -> list[torch.nn.Parameter]:
        """Every gate's weight: what trains with the adapter."""
        return [p for gate in self.gates.values() for p in gate.parameters()]

    def state(self) -> AdapterState:
        """A detached float32 CPU copy of the gates, keyed as `initial_gates` keys them."""
        import torch  # noqa: PLC0415 - heavy: torch

        return OrderedDict(
            (GATE_PREFIX + name, gate.weight.detach().to("cpu", torch.float32, copy=True))
            for name, gate in self.gates.items()
        )


class _Slot:
    """One layer's mixing weights, from its gate's pre-hook to its adapters' hooks."""

    def __init__(self) -> None:
        self.weights: torch.Tensor | None = None  # (..., 2), the layer input's leading shape


def _gate_input(mixer: Mixer, name: str, slot: _Slot, layer: Any, args: tuple[Any, ...]) -> None:
    # A forward pre-hook on the layer: g = softmax(G x), in float32 whatever the base computes in.
    import torch  # noqa: PLC0415 - heavy: torch

    gate = mixer.gates[name]
    x = args[0]  # (..., d_in)
    slot.weights = torch.softmax(gate(x.to(gate.weight.dtype)), dim=-1)  # (..., 2)
    mixer.weights[name] = slot.weights.detach()


def _scale(slot: _Slot, index: int, module: Any, inputs: Any, output: torch.Tensor) -> torch.Tensor:
    # A forward hook on an adapter's lora_B: its output B A x (..., d_out) times g_index(x).
    if slot.weights is None:
        raise FedloraError("mixer: an adapter computed before its layer's gate")
    return output * slot.weights[..., index : index + 1].to(output.dtype)


@contextlib.contextmanager
def mixed(
    model: PeftModel, adapters: tuple[str, str], gates: Mapping[str, torch.Tensor], *, train: bool = False
) -> Iterator[Mixer]:
    """While inside, each layer carrying both ``adapters`` mixes their deltas with its gate.

    The model must compute with both adapters (`fedlora.lora.adapters.activate`); the
    gates come from ``gates`` (keys as `initial_gates` makes them) and train when
    ``train`` (pass `Mixer.parameters` to the training loop). Everything is removed on
    exit, whatever happens inside.

    Raises
    ------
    FedloraError
        If ``gates`` lacks a layer's gate or has one of the wrong shape, or a layer is not
        plain LoRA.

    """
    import torch  # noqa: PLC0415 - heavy: torch

    layers = list(_mixed_layers(model, adapters))
    mixer = Mixer({})
    handles: list[torch.utils.hooks.RemovableHandle] = []
    try:
        for name, layer in layers:
            weight = gates.get(GATE_PREFIX + name)
            if weight is None or tuple(weight.shape) != (2, layer.in_features):
                shape = None if weight is None else tuple(weight.shape)
                raise FedloraError(f"mixer: the gate of {name} is {shape}, expected (2, {layer.in_features})")
            device = layer.lora_A[adapters[1]].weight.device
            gate = torch.nn.Linear(layer.in_features, 2, bias=False, device=device, dtype=torch.float32)
            with torch.no_grad():
                gate.weight.copy_(weight)
            gate.weight.requires_grad_(train)
            layer.add_module(_GATE_MODULE, gate)
            mixer.gates[name] = gate
            slot = _Slot()
            handles.append(layer.register_forward_pre_hook(functools.partial(_gate_input, mixer, name, slot)))
            for index, adapter in enumerate(adapters):
                hook = functools.partial(_scale, slot, index)
                handles.append(layer.lora_B[adapter].register_forward_hook(hook))
        yield mixer
    finally:
        for handle in handles:
            handle.remove()
        for _, layer in layers:
            if _GATE_MODULE in layer._modules:
                delattr(layer, _GATE_MODULE)
