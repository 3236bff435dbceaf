"""Where a client computes, and in which number formats: devices, dtypes, autocast, quantization.

`check_compute` runs before any training (in `fedlora simulate`'s preflight, and on a
deployed node for its own device) and names the key at fault in one line: a device that
is not there, fp16 or a float16 base on the CPU, a quantized base without CUDA or
without bitsandbytes. The adapters themselves are always float32: what is exchanged and
aggregated does not depend on any of this.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from fedlora.config import ModelConfig
from fedlora.core.errors import ModelError

if TYPE_CHECKING:
    import torch

__all__ = ["autocast", "check_compute", "model_device", "resolve_device", "torch_dtype"]

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
_AUTOCAST = {"bf16": "bfloat16", "fp16": "float16"}


def resolve_device(name: str) -> torch.device:
    """The torch device that ``device`` names; ``auto`` picks CUDA, then MPS, then the CPU.

    Raises
    ------
    ModelError
        If the named device is not on this machine.

    """
    import torch  # noqa: PLC0415 - heavy: torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ModelError(
                f"device: {name!r} needs a CUDA GPU, and torch sees none on this machine (torch "
                f"{torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); use device=auto or cpu"
            )
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise ModelError(
                f"device: {name!r} is not here; this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                f"cuda:0 to cuda:{torch.cuda.device_count() - 1}"
            )
        return torch.device(name)
    if name == "mps" and not torch.backends.mps.is_available():
        raise ModelError("device: 'mps' needs Apple silicon with a torch MPS build; use device=auto or cpu")
    return torch.device(name)


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a ``base-dtype`` value."""
    import torch  # noqa: PLC0415 - heavy: torch

    return getattr(torch, _DTYPES[name])


def check_compute(model: ModelConfig) -> torch.device:
    """The device a client will compute on, after checking that every format asked for works there.

    Raises
    ------
    ModelError
        Naming the key (``device``, ``precision``, ``base-dtype``, ``quantization``) and
        what would work.

    """
    import torch  # noqa: PLC0415 - heavy: torch

    device = resolve_device(model.device)
    if model.precision == "fp16" and device.type == "cpu":
        raise ModelError(
            "precision: fp16 needs a GPU (the CPU has no fast float16 kernels); use bf16 or fp32"
        )
    if model.base_dtype == "float16" and device.type == "cpu":
        raise ModelError("base-dtype: float16 needs a GPU; on the CPU use bfloat16 (half the memory too)")
    if device.type == "cuda" and "bf16" in (model.precision, _bf16(model.base_dtype)):
        if not torch.cuda.is_bf16_supported():
            raise ModelError(
                "precision: this GPU has no bfloat16 support; use precision=fp16 and base-dtype=float16"
            )
    if model.quantization != "none":
        key = f"quantization: {model.quantization}"
        if device.type != "cuda":
            raise ModelError(f"{key} needs a CUDA GPU (bitsandbytes), and this run computes on {device.type}")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ModelError(f"{key} needs the package bitsandbytes (pip install bitsandbytes)")
    return device


def _bf16(base_dtype: str) -> str:
    return "bf16" if base_dtype == "bfloat16" else ""


def model_device(model: Any) -> torch.device:
    """The device of a model's parameters."""
    return next(model.parameters()).device


@contextlib.contextmanager
def autocast(precision: str, device: torch.device) -> Iterator[None]:
    """Autocast to ``precision`` (``bf16``/``fp16``) on ``device``; ``fp32`` computes as it is."""
    import torch  # noqa: PLC0415 - heavy: torch

    if precision == "fp32":
        yield
        return
    with torch.autocast(device_type=device.type, dtype=getattr(torch, _AUTOCAST[precision])):
        yield
