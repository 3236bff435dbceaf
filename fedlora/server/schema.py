"""What a client's reply may hold, field by field: checked before anything else reads it.

A reply is untrusted input: one registered device, or one buggy client, can send any
records, any array dtypes and shapes, and any metric keys and values. Flower's own
aggregation raises on replies whose metric keys differ (`InconsistentMessageReplies`),
NumPy raises on a string array, and ``float(inf)`` overflows where an integer is made:
any of these would end the ServerApp, so every reply is screened here first.

`ReplySchema` holds, for one kind of reply (``train``, ``evaluate``, ``local-only``), the
metric keys it must carry, exactly (the configuration decides which: DP adds
``epsilon``, the final round the audits), the range of every value (`METRIC_RULES`),
and whether it carries the adapter's tensors (float32 only). `ReplySchema.problem` names
what is wrong, decoding every tensor under a guard. The
``partition-id`` a simulated client sends to name itself is the one optional key.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Message

from fedlora.core import keys

if TYPE_CHECKING:
    from fedlora.config import RunConfig

__all__ = [
    "EVALUATE",
    "LOCAL_ONLY",
    "METRIC_RULES",
    "TRAIN",
    "MetricRule",
    "ReplyKind",
    "ReplySchema",
    "expected_metrics",
]

ReplyKind = str  # "train", "evaluate" or "local-only"
TRAIN, EVALUATE, LOCAL_ONLY = "train", "evaluate", "local-only"

_FLOAT32 = "float32"
_NUMPY = "numpy.ndarray"
# Generous bounds an honest client never reaches; they keep counts and sums finite.
_MAX_COUNT = 10**9
_MAX_LOSS = 1e6
_MAX_SECONDS = 1e7


@dataclass(frozen=True)
class MetricRule:
    """The values one metric may take.

    Attributes
    ----------
    low, high : float
        The closed range of the value.
    whole : bool
        Whether the value must be a whole number.
    nan_ok : bool
        Whether NaN is accepted (a measurement that could not be made, e.g. an empty split).

    """

    low: float
    high: float
    whole: bool = False
    nan_ok: bool = False

    def problem(self, key: str, found: object) -> str | None:
        """Why ``found`` is not a value of ``key``, or None."""
        if isinstance(found, bool) or not isinstance(found, (int, float)):
            return f"metric {key!r} must be a number, got {type(found).__name__}"
        if math.isnan(found):
            return None if self.nan_ok else f"metric {key!r} is NaN"
        if not self.low <= found <= self.high:
            return f"metric {key!r} is {found!r}, outside [{self.low:g}, {self.high:g}]"
        if self.whole and found != int(found):
            return f"metric {key!r} is {found!r}, not a whole number"
        return None


_SHARE = MetricRule(0.0, 1.0, nan_ok=True)
_LOSS = MetricRule(0.0, _MAX_LOSS, nan_ok=True)
_COUNT = MetricRule(0, _MAX_COUNT, whole=True)

# Every metric a fedlora client sends, and its range (documented in the README's security section).
METRIC_RULES: Mapping[str, MetricRule] = {
    keys.M_NUM_EXAMPLES: _COUNT,
    keys.M_PARTITION_ID: _COUNT,
    keys.M_TRAIN_LOSS: MetricRule(0.0, _MAX_LOSS),
    keys.M_TRAIN_STEPS: _COUNT,
    keys.M_TRAIN_WALL_S: MetricRule(0.0, _MAX_SECONDS),
    keys.M_PERSONAL_STEPS: _COUNT,
    keys.M_PERSONAL_LOSS: MetricRule(0.0, _MAX_LOSS),
    keys.M_PERSONAL_ROUNDS: _COUNT,
    keys.M_ACCURACY_GLOBAL: _SHARE,
    keys.M_ACCURACY_PERSONALIZED: _SHARE,
    keys.M_ACCURACY_LOCAL_ONLY: _SHARE,
    keys.M_LOSS_GLOBAL: _LOSS,
    keys.M_LOSS_PERSONALIZED: _LOSS,
    keys.M_LOSS_LOCAL_ONLY: _LOSS,
    keys.M_EPSILON: MetricRule(0.0, math.inf),  # a spent budget may be unbounded
    keys.M_BUDGET_EXHAUSTED: MetricRule(0, 1, whole=True),
    keys.M_UNIT_WEIGHT: MetricRule(1, 1, whole=True),
    keys.M_MIA_GLOBAL: _SHARE,
    keys.M_MIA_PERSONALIZED: _SHARE,
    keys.M_MIA_CHANCE: _SHARE,
    keys.M_MIA_EXAMPLES: _COUNT,
    # Exposure in bits: at most log2 of the alternatives ranked; NaN on clients without the canary.
    keys.M_CANARY_GLOBAL: MetricRule(0.0, 64.0, nan_ok=True),
    keys.M_CANARY_PERSONALIZED: MetricRule(0.0, 64.0, nan_ok=True),
    # Mean paired gains (accuracy, or loss for causal LMs) and their standard errors.
    keys.M_GAIN_GLOBAL: MetricRule(-_MAX_LOSS, _MAX_LOSS, nan_ok=True),
    keys.M_GAIN_GLOBAL_SE: _LOSS,
    keys.M_GAIN_LOCAL_ONLY: MetricRule(-_MAX_LOSS, _MAX_LOSS, nan_ok=True),
    keys.M_GAIN_LOCAL_ONLY_SE: _LOSS,
    keys.M_MIX_WEIGHT: MetricRule(0.0, 1.0),
}


def expected_metrics(cfg: RunConfig, kind: ReplyKind, server_round: int) -> frozenset[str]:
    """The metric keys a ``kind`` reply of ``server_round`` carries, ``partition-id`` aside.

    This mirrors what `fedlora.client.recipe` sends for the configuration.
    """
    privacy, fed = cfg.privacy, cfg.federation
    dp = {keys.M_EPSILON, keys.M_BUDGET_EXHAUSTED} if privacy.enabled else set()
    unit = {keys.M_UNIT_WEIGHT} if privacy.client_level else set()
    if kind == LOCAL_ONLY:
        found = {
            keys.M_NUM_EXAMPLES,
            keys.M_ACCURACY_LOCAL_ONLY,
            keys.M_LOSS_LOCAL_ONLY,
            keys.M_TRAIN_STEPS,
            keys.M_TRAIN_WALL_S,
            keys.M_GAIN_LOCAL_ONLY,
            keys.M_GAIN_LOCAL_ONLY_SE,
        }
    elif kind == TRAIN:
        found = {keys.M_NUM_EXAMPLES, keys.M_TRAIN_LOSS, keys.M_TRAIN_STEPS, keys.M_TRAIN_WALL_S, *dp, *unit}
    else:
        found = {keys.M_NUM_EXAMPLES, keys.M_PERSONAL_STEPS, keys.M_PERSONAL_LOSS, keys.M_PERSONAL_ROUNDS}
        found |= dp | unit
        if fed.evaluates(server_round):
            found |= {
                keys.M_ACCURACY_GLOBAL,
                keys.M_ACCURACY_PERSONALIZED,
                keys.M_LOSS_GLOBAL,
                keys.M_LOSS_PERSONALIZED,
                keys.M_GAIN_GLOBAL,
                keys.M_GAIN_GLOBAL_SE,
            }
            if cfg.train.personal_mix != "off":
                found.add(keys.M_MIX_WEIGHT)
            if server_round >= fed.num_server_rounds:
                if privacy.audit_examples:
                    found |= {
                        keys.M_MIA_GLOBAL,
                        keys.M_MIA_PERSONALIZED,
                        keys.M_MIA_CHANCE,
                        keys.M_MIA_EXAMPLES,
                    }
                if privacy.canary_repeats:
                    found |= {keys.M_CANARY_GLOBAL, keys.M_CANARY_PERSONALIZED}
    return frozenset(found)


@dataclass(frozen=True)
class ReplySchema:
    """One kind of reply, as this run's clients send it.

    Attributes
    ----------
    kind : str
        ``train``, ``evaluate`` or ``local-only``.
    metrics : frozenset[str]
        The metric keys the reply must carry, exactly (``partition-id`` may come on top).
    num_partitions : int
        A ``partition-id`` must lie in ``[0, num_partitions)``.

    """

    kind: ReplyKind
    metrics: frozenset[str]
    num_partitions: int = _MAX_COUNT

    @classmethod
    def for_round(
        cls, cfg: RunConfig, kind: ReplyKind, server_round: int, num_partitions: int
    ) -> ReplySchema:
        """The schema of ``kind`` replies in ``server_round`` of a run configured by ``cfg``."""
        return cls(kind, expected_metrics(cfg, kind, server_round), max(1, num_partitions))

    def problem(self, message: Message) -> str | None:
        """Why ``message`` must not be read further, or None if its records and metrics are valid.

        Error replies have no content to check and pass (they count as failed).
        """
        if message.has_error():
            return None
        content = message.content
        if set(content.config_records):
            return f"unexpected config record {sorted(content.config_records)[0]!r}"
        if set(content.metric_records) != {keys.METRICS}:
            return f"expected one metric record {keys.METRICS!r}, got {sorted(content.metric_records)}"
        wants_arrays = self.kind == TRAIN
        if set(content.array_records) != ({keys.ARRAYS} if wants_arrays else set()):
            want = f"one array record {keys.ARRAYS!r}" if wants_arrays else "no array record"
            return f"expected {want}, got {sorted(content.array_records)}"
        return self._metrics_problem(content.metric_records[keys.METRICS]) or (
            self._arrays_problem(message) if wants_arrays else None
        )

    def _metrics_problem(self, metrics: Mapping[str, object]) -> str | None:
        found = set(metrics) - {keys.M_PARTITION_ID}
        missing, extra = sorted(self.metrics - found), sorted(found - self.metrics)
        if extra:
            return f"unexpected metric {extra[0]!r} (a {self.kind} reply carries {sorted(self.metrics)})"
        if missing:
            return f"missing metric {missing[0]!r}"
        for key, found_value in metrics.items():
            reason = METRIC_RULES[key].problem(key, found_value)
            if reason:
                return reason
        pid = metrics.get(keys.M_PARTITION_ID)
        if pid is not None and not pid < self.num_partitions:  # type: ignore[operator]
            last = self.num_partitions - 1
            return f"metric {keys.M_PARTITION_ID!r} is {pid!r}, not a partition of this run (0-{last})"
        return None

    @staticmethod
    def _arrays_problem(message: Message) -> str | None:
        for key, array in message.content.array_records[keys.ARRAYS].items():
            if array.stype != _NUMPY or array.dtype != _FLOAT32:
                return f"tensor {key!r} is {array.dtype} ({array.stype}), expected {_FLOAT32}"
            shape = tuple(array.shape)
            if not all(isinstance(d, int) and d >= 0 for d in shape):
                return f"tensor {key!r} declares shape {shape}"
            try:
                decoded = array.numpy()
            except Exception as err:  # any undecodable payload is the sender's fault
                return f"tensor {key!r} cannot be decoded ({type(err).__name__})"
            if decoded.dtype != np.float32 or tuple(decoded.shape) != shape:
                found = f"{decoded.dtype} {tuple(decoded.shape)}"
                return f"tensor {key!r} holds {found}, declared {array.dtype} {shape}"
        return None
