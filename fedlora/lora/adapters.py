"""Adapter codec: the only place that turns model tensors into what leaves a client."""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedlora.core.errors import FedloraError

if TYPE_CHECKING:
    import torch
    from flwr.app import ArrayRecord
    from peft import LoraConfig, PeftModel
from flwr.app import Array, ArrayRecord

__all__ = [
    "AdapterState",
    "activate",
    "adapter_state",
    "from_record",
    "load_adapter_state",
    "proximal_term",
    "state_key",
    "save_peft_adapter",
    "to_record",
]

AdapterState = dict[str, "torch.Tensor"]


def adapter_state(model: PeftModel, name: str) -> AdapterState:
    """A detached float32 CPU copy of one adapter's tensors, keyed as in PEFT's saved format.

    For classification this includes the adapter's copy of the task head. Whatever device
    and base dtype the model computes with, what is exchanged and stored is the same.
    """
    import torch  # noqa: PLC0415 - heavy: torch
    from peft import get_peft_model_state_dict  # noqa: PLC0415 - heavy: peft

    state = get_peft_model_state_dict(model, adapter_name=name)
    return OrderedDict((k, v.detach().to("cpu", torch.float32, copy=True)) for k, v in state.items())


def load_adapter_state(model: PeftModel, name: str, state: AdapterState) -> None:
    """Overwrite every tensor of adapter ``name``; the keys must match exactly.

    Raises
    ------
    FedloraError
        If ``state`` lacks a key of the adapter or carries one it does not have.

    """
    from peft import get_peft_model_state_dict, set_peft_model_state_dict  # noqa: PLC0415 - heavy: peft

    expected = get_peft_model_state_dict(model, adapter_name=name)
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise FedloraError(
            f"adapter '{name}': keys do not match (missing {missing[:2]}, unexpected {extra[:2]})"
        )
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise FedloraError(
                f"adapter '{name}': {key} has shape {tuple(value.shape)}, "
                f"expected {tuple(expected[key].shape)}"
            )
    set_peft_model_state_dict(model, state, adapter_name=name)


def activate(
    model: PeftModel, names: list[str], *, trainable: list[str], frozen: Collection[str] = ()
) -> None:
    """Make ``names`` the adapters that compute (LoRA deltas summed) and ``trainable`` train.

    The task head comes from the last adapter in ``names`` (PEFT keeps one active head).
    ``frozen`` parts (``lora_A``, ``lora_B``) of the trainable adapters stay fixed.
    """
    from peft.tuners.lora import LoraLayer  # noqa: PLC0415 - heavy: peft
    from peft.utils import ModulesToSaveWrapper  # noqa: PLC0415 - heavy: peft

    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.set_adapter(names)
        elif isinstance(module, ModulesToSaveWrapper):
            module.set_adapter(names[-1])
    for param_name, param in model.named_parameters():
        is_adapter = "lora_" in param_name or "modules_to_save" in param_name
        param.requires_grad = (
            is_adapter
            and any(f".{t}." in param_name for t in trainable)
            and not any(f".{part}." in param_name for part in frozen)
        )


def state_key(param_name: str, name: str) -> str:
    """Saved-state key of an adapter parameter: ``q.lora_A.global.weight`` -> ``q.lora_A.weight``."""
    return param_name.replace(f".{name}.", ".").replace(".modules_to_save.", ".")


def proximal_term(
    model: PeftModel, name: str, reference: Mapping[str, torch.Tensor], weight: float
) -> Callable[[], torch.Tensor]:
    """``weight/2 * sum ||p - reference||^2`` over adapter ``name``'s trainable tensors.

    FedProx's proximal term (Li et al., MLSys 2020) and Ditto's regulariser (Li et al.,
    ICML 2021) alike: it pulls a locally trained adapter toward a reference adapter.
    """
    pairs = [
        (param, reference[state_key(param_name, name)].to(param.device, param.dtype))
        for param_name, param in model.named_parameters()
        if param.requires_grad and f".{name}." in param_name
    ]

    def term() -> torch.Tensor:
        return 0.5 * weight * sum(((p - ref) ** 2).sum() for p, ref in pairs)  # type: ignore[return-value]

    return term


def to_record(state: AdapterState) -> ArrayRecord:
    """Encode adapter tensors as an ArrayRecord (float32 NumPy arrays, same keys)."""
    return ArrayRecord(OrderedDict((k, Array(v.detach().cpu().float().numpy())) for k, v in state.items()))


def from_record(record: ArrayRecord) -> AdapterState:
    """Decode an ArrayRecord made by `to_record` back into CPU tensors."""
    import torch  # noqa: PLC0415 - heavy: torch

    return OrderedDict((k, torch.from_numpy(np.array(arr.numpy(), copy=True))) for k, arr in record.items())


def save_peft_adapter(
    directory: Path,
    state: AdapterState,
    config: LoraConfig,
    *,
    base_delta: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` as PEFT does.

    The folder loads with ``PeftModel.from_pretrained(base_model, directory)``. Strategies
    that fold updates into the base weights (FedEx-LoRA, FLoRA) also get
    ``base_delta.safetensors``: per adapted module (``<module>.weight`` as in the base
    model's state dict) the dense update to add to that weight before loading the adapter.
    """
    from safetensors.torch import save_file  # noqa: PLC0415 - heavy: safetensors

    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(directory))
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    if base_delta:
        # "base_model.model.bert....query" -> "bert....query.weight" (the base model's own key).
        dense = {
            f"{m.removeprefix('base_model.model.')}.weight": v.detach().cpu().float().contiguous()
            for m, v in base_delta.items()
        }
        save_file(dense, str(directory / "base_delta.safetensors"), metadata={"format": "pt"})
    # Keep a human-readable list of what the adapter holds next to the weights.
    (directory / "adapter_keys.json").write_text(
        json.dumps({k: list(v.shape) for k, v in tensors.items()}, indent=1)
    )
    return directory
