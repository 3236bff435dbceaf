"""Memory a half-precision base does not need to spend: what a bfloat16 client keeps per step.

A bfloat16 base halves the weights, but three things kept the step's working memory at
float32's size. `lean_half_precision` removes them on a model whose base is bfloat16 or
float16 (a float32 base is left exactly as it is):

- **RMSNorm's float32 copies.** Llama-family norms (Llama, Mistral, Qwen2, Qwen3, Phi-3)
  upcast their input to float32, and autograd keeps that copy for the backward pass, per
  norm and per layer. `_LeanRMSNorm` computes the same forward but keeps only its
  bfloat16 input and the float32 inverse norm per token, and recomputes the rest in
  backward.
- **oneDNN's primitive cache** (CPU only). bfloat16 matrix products run through oneDNN,
  which caches a compiled kernel, with its buffers, per distinct shape: up to 1,024 of
  them. Batches are trimmed to their longest row and the loss takes only real tokens,
  so the shapes vary from batch to batch and the cache, and the process, grow step
  after step. `ONEDNN_PRIMITIVE_CACHE_CAPACITY` is set to 16 unless the environment
  already sets it (it is read once, when oneDNN first runs).
- **PEFT's cast of a layer's input under autocast.** PEFT casts a bfloat16 input to the
  LoRA tensors' float32 before the LoRA matrices, and autocast casts it straight back:
  the same bfloat16 numbers, and one more float32 copy per adapted layer kept for
  backward. `uncast_lora_inputs` skips that cast inside an autocast region; the result
  is bit for bit the same.
"""

from __future__ import annotations

import contextlib
import functools
import os
import types
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["lean_half_precision", "uncast_lora_inputs"]

# transformers' RMSNorm classes whose forward is Llama's:
# ``weight * (x.float() * rsqrt(mean(x.float()**2) + eps)).to(x.dtype)``.
_LLAMA_NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm"})
_ONEDNN_CACHE = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
_ONEDNN_CACHE_SIZE = "16"


@functools.cache
def _norm_function() -> Any:
    """The autograd function of a lean norm (defined once, on first use: it needs torch)."""
    import torch  # noqa: PLC0415 - heavy: torch

    class _LeanRMSNorm(torch.autograd.Function):
        """Llama's RMSNorm, keeping the input (its dtype) and the inverse norm for backward."""

        @staticmethod
        def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
            inverse = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
            ctx.save_for_backward(x, weight, inverse)
            return weight * (x.float() * inverse).to(x.dtype)

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
            x, weight, inverse = ctx.saved_tensors
            normed = x.float() * inverse
            grad_weight = None
            if ctx.needs_input_grad[1]:
                grad_weight = (grad * normed.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
            grad_normed = (grad * weight).float()
            grad_x = inverse * (grad_normed - normed * (grad_normed * normed).mean(-1, keepdim=True))
            return grad_x.to(x.dtype), grad_weight, None

    return _LeanRMSNorm


def _lean_forward(self: Any, hidden_states: torch.Tensor) -> torch.Tensor:
    return self._lean_norm.apply(hidden_states, self.weight, self.variance_epsilon)


def lean_half_precision(model: Any, device: torch.device) -> int:
    """On a bfloat16/float16 base: lean RMSNorms and, on the CPU, a bounded oneDNN cache.

    Returns how many norms now keep only their input for backward (0 on a float32 base).
    """
    import torch  # noqa: PLC0415 - heavy: torch

    dtypes = {p.dtype for p in model.parameters() if not p.requires_grad and p.is_floating_point()}
    if not dtypes & {torch.bfloat16, torch.float16}:
        return 0
    if device.type == "cpu":
        os.environ.setdefault(_ONEDNN_CACHE, _ONEDNN_CACHE_SIZE)
    function = _norm_function()
    count = 0
    for module in model.modules():
        if type(module).__name__ in _LLAMA_NORMS and module.weight.dtype != torch.float32:
            module._lean_norm = function
            module.forward = types.MethodType(_lean_forward, module)
            count += 1
    return count


@contextlib.contextmanager
def uncast_lora_inputs(model: Any, precision: str) -> Iterator[None]:
    """Inside autocast (``precision`` bf16/fp16): PEFT passes layer inputs to LoRA uncast."""
    if precision == "fp32" or not hasattr(model, "peft_config"):
        yield
        return
    from peft.helpers import disable_input_dtype_casting  # noqa: PLC0415 - heavy: peft

    with disable_input_dtype_casting(model):
        yield
