"""Per-example adapter weights: each adapter's LoRA output scaled row by row inside the forward pass.

PEFT sums the active adapters' deltas at full weight: ``W0 x + sum_a s_a B_a A_a x``.
Inside `row_weighted`, forward hooks on every ``lora_B`` multiply adapter ``a``'s term by
``weights.lora[a]``, a scalar or one weight per batch row, so that each example of a batch
gets its own mix: ``W0 x_i + sum_a w_a[i] s_a B_a A_a x_i``. A weight of exactly 1 or 0
gives exactly the unweighted sum or the sum without that adapter.

A task head is not a delta: PEFT keeps one active copy per head. With ``head_base`` set,
the head computes ``lerp(head[head_base](h), head[active](h), w_active)``: the active
copy's offset from the base copy, weighted like that adapter's LoRA output.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fedlora.core.errors import FedloraError

if TYPE_CHECKING:
    import torch
    from peft import PeftModel

__all__ = ["RowWeights", "row_weighted"]


@dataclass
class RowWeights:
    """What `row_weighted` multiplies each adapter's LoRA output by; read at every forward pass.

    ``lora`` maps an adapter name to a float or a (B,) tensor; an adapter it does not name
    computes as usual. ``head_base``: the adapter whose head copy the active copy is
    weighted against (None: the head is left alone).
    """

    lora: dict[str, float | torch.Tensor] = field(default_factory=dict)
    head_base: str | None = None


def _per_row(weight: float | torch.Tensor, output: torch.Tensor) -> float | torch.Tensor:
    """``weight`` shaped to broadcast over ``output`` (B, ...): (B, 1, ..., 1) in its dtype."""
    if isinstance(weight, float):
        return weight
    if weight.shape != (output.shape[0],):
        raise FedloraError(
            f"row weights: {tuple(weight.shape)} weights for a batch of {output.shape[0]} rows"
        )
    return weight.to(output.device, output.dtype).view(-1, *([1] * (output.dim() - 1)))


def _scale_lora(weights: RowWeights, name: str, module: Any, inputs: Any, output: torch.Tensor) -> Any:
    # A forward hook on ``lora_B[name]``: its output B A x (B, ..., d_out) times the row weights.
    weight = weights.lora.get(name)
    return None if weight is None else output * _per_row(weight, output)


def _mix_head(
    weights: RowWeights, wrapper: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: torch.Tensor
) -> Any:
    # A forward hook on a head wrapper: the active copy's output, pulled toward the base copy's.
    import torch  # noqa: PLC0415 - heavy: torch

    base, active = weights.head_base, wrapper.active_adapters[0] if wrapper.active_adapters else None
    weight = weights.lora.get(active) if active is not None else None
    if base is None or weight is None or active == base or wrapper.disable_adapters:
        return None
    base_output = wrapper.modules_to_save[base](*args, **kwargs)
    # lerp is exact at both ends: weight 0 gives the base copy's output, 1 the active copy's.
    return torch.lerp(base_output, output, _per_row(weight, output))


@contextlib.contextmanager
def row_weighted(model: PeftModel, weights: RowWeights) -> Iterator[RowWeights]:
    """While inside, every forward pass weights each adapter's LoRA output by ``weights``.

    ``weights`` may be changed between (or during) forward passes; the hooks read it each
    time. They are removed on exit, whatever happens inside.

    Raises
    ------
    FedloraError
        If an adapted layer is not plain LoRA (a DoRA-like variant), whose delta is not
        its ``lora_B`` output; or, at a forward pass, if a weight tensor's length is not
        the batch's.

    """
    from peft.tuners.lora import LoraLayer  # noqa: PLC0415 - heavy: peft
    from peft.utils import ModulesToSaveWrapper  # noqa: PLC0415 - heavy: peft

    handles: list[torch.utils.hooks.RemovableHandle] = []
    try:
        for module_name, module in model.named_modules():
            if isinstance(module, LoraLayer):
                if getattr(module, "lora_variant", None):
                    raise FedloraError(f"row weights: {module_name} is not plain LoRA")
                for name, up in module.lora_B.items():
                    handles.append(up.register_forward_hook(functools.partial(_scale_lora, weights, name)))
            elif isinstance(module, ModulesToSaveWrapper):
                hook = functools.partial(_mix_head, weights)
                handles.append(module.register_forward_hook(hook, with_kwargs=True))
        yield weights
    finally:
        for handle in handles:
            handle.remove()
