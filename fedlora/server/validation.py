"""Server-side checks of every upload before aggregation: a bad reply is dropped, not averaged.

A client that sends NaN or Inf, tensors the strategy does not expect (missing, extra, of
the wrong shape or LoRA rank), an update larger than ``max-update-norm``, or claims a
weight (``num-examples``) that is not a whole number from 1 to ``max-examples-per-client``
would poison the mean, take it over, or stop Flower's aggregation altogether.
`UploadCheck` names the problem; the recording wrapper logs it with the node and
aggregates the others. Under secure
aggregation the server never sees individual uploads, so it cannot check them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from flwr.app import Message

from fedlora.core import keys
from fedlora.lora.adapters import AdapterState, from_record
from fedlora.lora.maths import part_of
from fedlora.server.recorder import RunRecorder
from fedlora.server.replies import client_of, metrics_of

if TYPE_CHECKING:
    from fedlora.strategies.registry import StrategyInfo

__all__ = ["UploadCheck", "drop_invalid"]

log = logging.getLogger(__name__)


def _rank_dim(key: str) -> int | None:
    # PEFT's lora_A is (r, d_in) and lora_B is (d_out, r).
    return 0 if part_of(key) == "lora_A" else 1 if part_of(key) == "lora_B" else None


@dataclass(frozen=True)
class UploadCheck:
    """What a valid upload looks like in this run.

    Attributes
    ----------
    expected : Mapping[str, tuple[int, ...]]
        Every tensor a client must send, with its shape at the run's LoRA rank.
    any_rank : bool
        Whether clients may use their own rank (the LoRA rank dimension may differ).
    max_norm : float
        Bound on the L2 norm of an upload minus the global arrays the client started from
        (over the tensors both hold; ``inf``: no bound).
    max_examples : int
        The largest number of training examples a reply may claim: the weight of its
        upload in the mean.
    unit_weight : bool
        Client-level DP: every reply must weigh exactly 1.

    """

    expected: Mapping[str, tuple[int, ...]]
    any_rank: bool = False
    max_norm: float = math.inf
    max_examples: int = 100_000
    unit_weight: bool = False

    @classmethod
    def for_run(
        cls,
        info: StrategyInfo,
        initial_global: AdapterState,
        max_norm: float,
        *,
        max_examples: int = 100_000,
        unit_weight: bool = False,
    ) -> UploadCheck:
        """The check for a strategy: the parts it shares, at the seeded adapter's shapes."""
        sent = info.protocol.sent
        expected = {k: tuple(v.shape) for k, v in initial_global.items() if part_of(k) in sent}
        return cls(expected, info.protocol.heterogeneous_ranks, max_norm, max_examples, unit_weight)

    def weight_problem(self, metrics: Mapping[str, object]) -> str | None:
        """Why the weight a reply claims must not be used, or None if it is fine.

        ``num-examples`` must be a whole number from 1 to ``max_examples``: a huge claim
        would make the mean the claimant's upload, NaN or Inf would poison it, a negative
        one push it away, and zero weights would leave nothing to divide by.
        """
        claimed = metrics.get(keys.M_NUM_EXAMPLES)
        if isinstance(claimed, bool) or not isinstance(claimed, (int, float)):
            return f"{keys.M_NUM_EXAMPLES} is missing or not a number ({claimed!r})"
        if not math.isfinite(claimed) or claimed != int(claimed):
            return f"{keys.M_NUM_EXAMPLES} {claimed!r} is not a whole number"
        if not 1 <= claimed <= self.max_examples:
            return (
                f"{keys.M_NUM_EXAMPLES} {int(claimed)} is outside [1, {self.max_examples}] "
                "(max-examples-per-client)"
            )
        unit = metrics.get(keys.M_UNIT_WEIGHT)
        if self.unit_weight and unit != 1:
            return f"{keys.M_UNIT_WEIGHT} must be 1 under client-level DP, got {unit!r}"
        return None

    def _shape_ok(self, key: str, shape: tuple[int, ...], want: tuple[int, ...]) -> bool:
        dim = _rank_dim(key)
        if not self.any_rank or dim is None or len(shape) != len(want):
            return shape == want
        return (
            all(s == w for i, (s, w) in enumerate(zip(shape, want, strict=True)) if i != dim)
            and shape[dim] > 0
        )

    def problem(self, upload: AdapterState, start: AdapterState) -> str | None:
        """Why ``upload`` must not be aggregated, or None if it is fine.

        ``start`` is what the server sent for this round (the update is measured against it).
        """
        import torch  # noqa: PLC0415 - heavy: torch

        missing = sorted(set(self.expected) - set(upload))
        if missing:
            return f"missing tensor {missing[0]!r} ({len(missing)} of {len(self.expected)} missing)"
        extra = sorted(set(upload) - set(self.expected))
        if extra:
            return f"unexpected tensor {extra[0]!r} (the strategy takes only its shared parts)"
        for key, tensor in upload.items():
            shape, want = tuple(tensor.shape), self.expected[key]
            if not self._shape_ok(key, shape, want):
                rank = " (any LoRA rank)" if self.any_rank and _rank_dim(key) is not None else ""
                return f"tensor {key!r} has shape {shape}, expected {want}{rank}"
            if not bool(torch.isfinite(tensor).all()):
                return f"tensor {key!r} holds NaN or Inf"
        if math.isfinite(self.max_norm):
            total = 0.0
            for key, tensor in upload.items():
                base = start.get(key)
                delta = tensor - base if base is not None and base.shape == tensor.shape else tensor
                total += float(delta.double().pow(2).sum())
            norm = math.sqrt(total)
            if norm > self.max_norm:
                return f"update norm {norm:.4g} exceeds max-update-norm {self.max_norm:g}"
        return None


def drop_invalid(
    check: UploadCheck, replies: list[Message], start: AdapterState, recorder: RunRecorder, server_round: int
) -> tuple[list[Message], int]:
    """The replies ``check`` accepts, and how many it rejected; each rejection is logged.

    Error replies are kept (they count as failed, not rejected).
    """
    kept, rejected = [], 0
    for m in replies:
        reason = None
        if not m.has_error():
            arrays = m.content.array_records.get(keys.ARRAYS)
            reason = check.weight_problem(metrics_of(m)) or (
                "no adapter tensors" if arrays is None else check.problem(from_record(arrays), start)
            )
        if reason is None:
            kept.append(m)
            continue
        rejected += 1
        node = m.metadata.src_node_id
        log.warning(
            "fedlora: round %d: rejected the update of node %s (client %s): %s",
            server_round,
            node,
            client_of(m),
            reason,
        )
        recorder.event("client-rejected", round=server_round, node=node, client=client_of(m), reason=reason)
    return kept, rejected
