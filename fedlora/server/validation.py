"""Server-side checks of every reply before anything reads it: a bad reply is dropped, not averaged.

Every reply is first held against its `fedlora.server.schema.ReplySchema` (records, float32
tensors, exactly the expected metric keys, each value in its range), so that no reply can
end the run. A train reply must then send exactly the tensors the strategy expects (no
NaN or Inf, the right shapes and LoRA ranks), claim a weight (``num-examples``) that is a
whole number from 1 to ``max-examples-per-client``, and stay within the update bounds:
``max-update-norm`` (an absolute bound) and ``max-update-norm-ratio`` (a multiple of the
round's lower-median update norm, so a huge upload is refused out of the box). After the
checks no client takes more than ``max-client-weight-share`` of the round's total weight
(`cap_shares`). `UploadCheck` names each problem; `screen_train` and `screen_replies` log
it with the node and keep the others. Under secure aggregation the server never sees
individual uploads, so it cannot check them.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from flwr.app import Message, MetricRecord, RecordDict

from fedlora.core import keys
from fedlora.lora.adapters import AdapterState, from_record
from fedlora.lora.maths import part_of
from fedlora.server.recorder import RunRecorder
from fedlora.server.replies import client_of, metrics_of, value
from fedlora.server.schema import TRAIN, ReplyKind, ReplySchema

if TYPE_CHECKING:
    from fedlora.config import RunConfig
    from fedlora.strategies.registry import StrategyInfo

__all__ = [
    "Owners",
    "UploadCheck",
    "cap_shares",
    "for_strategy",
    "screen_replies",
    "screen_train",
    "update_norm",
]

log = logging.getLogger(__name__)


def _rank_dim(key: str) -> int | None:
    # PEFT's lora_A is (r, d_in) and lora_B is (d_out, r).
    return 0 if part_of(key) == "lora_A" else 1 if part_of(key) == "lora_B" else None


def update_norm(upload: AdapterState, start: AdapterState) -> float:
    """The L2 norm of ``upload`` minus ``start`` (a tensor ``start`` lacks counts whole)."""
    total = 0.0
    for key, tensor in upload.items():
        base = start.get(key)
        delta = tensor - base if base is not None and base.shape == tensor.shape else tensor
        total += float(delta.double().pow(2).sum())
    return math.sqrt(total)


@dataclass(frozen=True)
class UploadCheck:
    """What a valid reply looks like in this run.

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
    max_norm_ratio : float
        An update whose norm exceeds this multiple of the round's lower-median update
        norm is dropped (``inf``: no bound).
    max_weight_share : float
        No client weighs more than this share of a round's total (at least ``1/n`` of
        ``n`` clients).
    cfg : RunConfig or None
        The run's configuration: replies are held against its `ReplySchema` (None: only
        the upload itself is checked).

    """

    expected: Mapping[str, tuple[int, ...]]
    any_rank: bool = False
    max_norm: float = math.inf
    max_examples: int = 100_000
    unit_weight: bool = False
    max_norm_ratio: float = math.inf
    max_weight_share: float = 1.0
    cfg: RunConfig | None = None

    @classmethod
    def for_run(cls, info: StrategyInfo, initial_global: AdapterState, cfg: RunConfig) -> UploadCheck:
        """The check for a run: the parts its strategy shares, at the seeded adapter's shapes."""
        sent, fed = info.protocol.sent, cfg.federation
        expected = {k: tuple(v.shape) for k, v in initial_global.items() if part_of(k) in sent}
        return cls(
            expected,
            any_rank=info.protocol.heterogeneous_ranks,
            max_norm=fed.max_update_norm,
            max_examples=fed.max_examples_per_client,
            unit_weight=cfg.privacy.client_level,
            max_norm_ratio=fed.max_update_norm_ratio,
            max_weight_share=fed.max_client_weight_share,
            cfg=cfg,
        )

    def schema(self, kind: ReplyKind, server_round: int, num_partitions: int) -> ReplySchema | None:
        """The schema of ``kind`` replies in ``server_round``, or None without a configuration."""
        if self.cfg is None:
            return None
        return ReplySchema.for_round(self.cfg, kind, server_round, num_partitions)

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
            norm = update_norm(upload, start)
            if norm > self.max_norm:
                return f"update norm {norm:.4g} exceeds max-update-norm {self.max_norm:g}"
        return None


@dataclass
class Owners:
    """Which node named itself with which ``partition-id``: the first claim holds for the run.

    A second node that claims a taken partition id is rejected, so no client can overwrite
    another's results. ``num_partitions`` bounds the ids (the nodes the run has seen).
    """

    num_partitions: int = 10**9
    by_partition: dict[int, int] = field(default_factory=dict)

    def problem(self, message: Message) -> str | None:
        """Why ``message`` may not carry its ``partition-id``, or None (the claim is then recorded)."""
        pid = value(metrics_of(message), keys.M_PARTITION_ID)
        if not (math.isfinite(pid) and pid >= 0 and pid == int(pid)):
            return None  # no claim (the schema refuses a malformed one)
        node = message.metadata.src_node_id
        owner = self.by_partition.setdefault(int(pid), node)
        return None if owner == node else f"partition-id {int(pid)} is node {owner}'s"


def _reject(
    recorder: RunRecorder,
    server_round: int | str,
    message: Message,
    reason: str,
    kind: str,
    *,
    named: bool = True,
) -> None:
    # ``named``: the reply's own partition id may name it (not when it claimed another's).
    node = message.metadata.src_node_id
    client = client_of(message, recorder.names) if named else f"node-{node}"
    log.warning(
        "fedlora: round %s: rejected the %s reply of node %s (client %s): %s",
        server_round,
        kind,
        node,
        client,
        reason,
    )
    recorder.event("client-rejected", round=server_round, node=node, client=client, reply=kind, reason=reason)


def screen_replies(
    check: UploadCheck | None,
    replies: Sequence[Message],
    kind: ReplyKind,
    server_round: int | str,
    recorder: RunRecorder,
    owners: Owners,
    *,
    schema_round: int | None = None,
) -> tuple[list[Message], int]:
    """The replies whose records and metrics fit their schema, and how many were rejected.

    Error replies are kept (they count as failed, not rejected). ``schema_round`` is the
    round whose schema applies (default ``server_round``).
    """
    kept, rejected = [], 0
    at = server_round if schema_round is None else schema_round
    schema = (
        check.schema(kind, at, owners.num_partitions) if check is not None and isinstance(at, int) else None
    )
    for m in replies:
        reason, named = None, True
        if not m.has_error():
            reason = schema.problem(m) if schema is not None else None
            if reason is None:
                reason = owners.problem(m)
                named = reason is None
        if reason is None:
            kept.append(m)
        else:
            rejected += 1
            _reject(recorder, server_round, m, reason, kind, named=named)
    return kept, rejected


def screen_train(
    check: UploadCheck,
    replies: Sequence[Message],
    start: AdapterState,
    recorder: RunRecorder,
    server_round: int,
    owners: Owners,
) -> tuple[list[Message], int]:
    """The train replies ``check`` accepts, and how many it rejected; each rejection is logged.

    After each reply's own checks, an update whose norm exceeds ``max-update-norm-ratio``
    times the round's lower-median norm (over the replies that passed) is rejected too:
    the lower median is an honest client's as long as fewer than half of a round's
    uploads collude.
    """
    screened, rejected = screen_replies(check, replies, TRAIN, server_round, recorder, owners)
    passed: list[tuple[Message, float]] = []
    kept: list[Message] = []
    for m in screened:
        if m.has_error():
            kept.append(m)
            continue
        arrays = m.content.array_records.get(keys.ARRAYS)
        reason = check.weight_problem(metrics_of(m))
        if reason is None and arrays is None:
            reason = "no adapter tensors"
        upload = from_record(arrays) if reason is None and arrays is not None else None
        if reason is None and upload is not None:
            reason = check.problem(upload, start)
        if reason is None and upload is not None:
            passed.append((m, update_norm(upload, start)))
        elif reason is not None:
            rejected += 1
            _reject(recorder, server_round, m, reason, TRAIN)
    if passed and math.isfinite(check.max_norm_ratio):
        norms = sorted(norm for _, norm in passed)
        median = norms[(len(norms) - 1) // 2]
        bound = check.max_norm_ratio * median
        record = recorder.round(server_round)
        record.update_norm_median = median
        record.update_norm_max = max((n for n in norms if n <= bound), default=math.nan)
        for m, norm in passed:
            if norm > bound:
                rejected += 1
                reason = (
                    f"update norm {norm:.4g} exceeds {check.max_norm_ratio:g} x the round's median "
                    f"{median:.4g} (max-update-norm-ratio)"
                )
                _reject(recorder, server_round, m, reason, TRAIN)
            else:
                kept.append(m)
    else:
        kept.extend(m for m, _ in passed)
    return kept, rejected


def cap_shares(weights: Sequence[float], share: float) -> list[float]:
    """``weights`` with none above ``share`` of their total (water-filling), the total kept.

    The cap is at least ``1/n``: ``n`` clients can always weigh the same. Capped clients
    weigh exactly ``share`` of the total; the others keep their proportions.
    """
    n = len(weights)
    if n == 0:
        return []
    total = float(sum(weights))
    cap = max(share, 1.0 / n)
    if total <= 0 or all(w <= cap * total for w in weights):
        return [float(w) for w in weights]
    capped: set[int] = set()
    while True:
        rest = sum(w for i, w in enumerate(weights) if i not in capped)
        if len(capped) * cap >= 1.0 or rest <= 0:
            return [total / n] * n
        # The capped clients hold cap of the total each; the rest hold what is left, in proportion.
        scale = (1.0 - len(capped) * cap) * total / rest
        over = {i for i, w in enumerate(weights) if i not in capped and w * scale > cap * total}
        if not over:
            return [cap * total if i in capped else w * scale for i, w in enumerate(weights)]
        capped |= over


def _with_metrics(message: Message, metrics: Mapping[str, float | int]) -> Message:
    content = RecordDict({name: record for name, record in message.content.array_records.items()})
    content[keys.METRICS] = MetricRecord(dict(metrics))
    return Message(content=content, metadata=copy.copy(message.metadata))  # type: ignore[call-overload]


def for_strategy(
    check: UploadCheck | None,
    replies: Sequence[Message],
    recorder: RunRecorder,
    server_round: int,
    *,
    train: bool = True,
) -> list[Message]:
    """The replies as the strategy sees them: training weights capped to ``max-client-weight-share``.

    The ``partition-id`` a simulated client names itself with is left out: a deployed
    device sends none, and Flower's aggregation wants the same metric keys from every
    reply. The caller's replies are not changed.
    """
    ok = [m for m in replies if not m.has_error()]
    weights = [value(metrics_of(m), keys.M_NUM_EXAMPLES) for m in ok]
    share = 1.0 if check is None or check.unit_weight or not train else check.max_weight_share
    capped = iter(cap_shares(weights, share))
    out = []
    for m in replies:
        if m.has_error():
            out.append(m)
            continue
        metrics = {k: v for k, v in metrics_of(m).items() if k != keys.M_PARTITION_ID}
        weight, claimed = next(capped), value(metrics, keys.M_NUM_EXAMPLES)
        if weight != claimed and keys.M_NUM_EXAMPLES in metrics:
            metrics[keys.M_NUM_EXAMPLES] = weight  # the others' weights grow in proportion: same total
        if weight < claimed:
            recorder.event(
                "weight-capped",
                round=server_round,
                node=m.metadata.src_node_id,
                client=client_of(m, recorder.names),
                claimed=claimed,
                weight=weight,
            )
        out.append(_with_metrics(m, metrics))
    return out
