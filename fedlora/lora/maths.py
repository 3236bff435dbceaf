"""Pure LoRA aggregation maths on adapter states: products, stacking, exact residuals, SVD.

An adapter state maps PEFT's saved keys to tensors. For an adapted module ``m`` it holds
``m.lora_A.weight`` (r, d_in) and ``m.lora_B.weight`` (d_out, r); the module's weight
update is ``scale * B @ A`` with ``scale = alpha / r``. Keys without ``lora_`` belong to
a dense task head. Updates folded into frozen base weights travel under
``base-delta::m`` (dense, (d_out, d_in)) or as factors ``base-delta-B::m`` (d_out, R)
and ``base-delta-A::m`` (R, d_in) whose product is the update.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = [
    "BASE_DELTA",
    "BASE_DELTA_A",
    "BASE_DELTA_B",
    "Part",
    "base_deltas",
    "compact",
    "lora_modules",
    "part_of",
    "products",
    "svd_factors",
    "weighted_mean",
]

State = Mapping[str, "torch.Tensor"]
Part = str  # "lora_A", "lora_B" or "head"

BASE_DELTA = "base-delta::"
BASE_DELTA_A = "base-delta-A::"
BASE_DELTA_B = "base-delta-B::"
_A, _B = ".lora_A.weight", ".lora_B.weight"


def part_of(key: str) -> Part:
    """Which part of an adapter a key belongs to: ``lora_A``, ``lora_B``, ``head`` or ``base-delta``."""
    if key.startswith("base-delta"):
        return "base-delta"
    if key.endswith(_A):
        return "lora_A"
    if key.endswith(_B):
        return "lora_B"
    return "head"


def lora_modules(state: State) -> list[str]:
    """Names of the adapted modules in a state (keys of ``m.lora_A.weight`` without the suffix)."""
    return [key[: -len(_A)] for key in state if key.endswith(_A)]


def products(state: State, alpha: float) -> dict[str, torch.Tensor]:
    """Each module's weight update ``(alpha / r) * B @ A``, (d_out, d_in), in float64."""
    out = {}
    for m in lora_modules(state):
        a, b = state[m + _A].double(), state[m + _B].double()  # (r, d_in), (d_out, r)
        out[m] = (alpha / a.shape[0]) * b @ a
    return out


def weighted_mean(
    states: Sequence[State], weights: Sequence[float], keys: Sequence[str]
) -> dict[str, torch.Tensor]:
    """Example-weighted mean of the given keys across states (float32 result)."""
    total = float(sum(weights))
    return OrderedDict(
        (k, sum((w / total) * s[k].double() for s, w in zip(states, weights, strict=True)).float())  # type: ignore[union-attr]
        for k in keys
    )


def base_deltas(record: State) -> dict[str, torch.Tensor]:
    """The dense update of every module named under a ``base-delta`` key (factors multiplied out)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in record.items():
        if key.startswith(BASE_DELTA):
            m = key[len(BASE_DELTA) :]
            out[m] = out.get(m, 0) + value.double()
        elif key.startswith(BASE_DELTA_B):
            m = key[len(BASE_DELTA_B) :]
            out[m] = out.get(m, 0) + value.double() @ record[BASE_DELTA_A + m].double()
    return out


def compact(factors_b: torch.Tensor, factors_a: torch.Tensor) -> tuple[str, list[torch.Tensor]]:
    """Cheaper of two exact encodings of ``B @ A``: the factors, or the dense product.

    Returns ``("factors", [B, A])`` while ``R * (d_out + d_in) < d_out * d_in``, else
    ``("dense", [B @ A])``.
    """
    d_out, rank = factors_b.shape
    d_in = factors_a.shape[1]
    if rank * (d_out + d_in) < d_out * d_in:
        return "factors", [factors_b, factors_a]
    return "dense", [factors_b.double() @ factors_a.double()]


def svd_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors of ``delta`` (d_out, d_in): ``B = U sqrt(S)``, ``A = sqrt(S) V^T``.

    ``B @ A`` is the truncated SVD of ``delta`` (Eckart-Young); the leading ``r`` columns
    of B and rows of A give the best rank-``r`` approximation for any ``r <= rank``.
    """
    import torch  # noqa: PLC0415 - heavy: the registries import this module, and need no torch

    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    k = min(rank, s.shape[0])
    root = s[:k].sqrt()
    b = u[:, :k] * root  # (d_out, k)
    a = root[:, None] * vh[:k]  # (k, d_in)
    if k < rank:  # a rank larger than the matrix allows: pad with zero directions
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - k)], dim=1)
        a = torch.cat([a, a.new_zeros(rank - k, a.shape[1])], dim=0)
    return b.float(), a.float()
