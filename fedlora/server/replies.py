"""Reading client replies on the server: their metrics, and the client each one names."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from flwr.app import Message

from fedlora.core import keys

__all__ = [
    "client_id",
    "client_of",
    "error_reason",
    "metric",
    "metrics_of",
    "order_key",
    "partition_id",
    "value",
]

# An error reply's reason is the client's text: kept to one line of at most this many characters.
MAX_REASON = 500


def metrics_of(message: Message) -> Mapping[str, Any]:
    """The reply's scalar metrics (empty for an error reply)."""
    return message.content.metric_records.get(keys.METRICS) or {}


def value(metrics: Mapping[str, Any], key: str) -> float:
    """A numeric metric, NaN when it is missing or not a number."""
    found = metrics.get(key)
    return float(found) if isinstance(found, (int, float)) else math.nan


def metric(message: Message, key: str) -> float:
    """A numeric metric of the reply, NaN when missing."""
    return value(metrics_of(message), key)


def partition_id(metrics: Mapping[str, Any]) -> int | None:
    """The partition id a simulated client names itself with (a whole number from 0), else None."""
    pid = value(metrics, keys.M_PARTITION_ID)
    return int(pid) if math.isfinite(pid) and pid >= 0 and pid == int(pid) else None


def client_id(metrics: Mapping[str, Any], node: int | str, names: Sequence[str] = ()) -> str:
    """A client's name in results.

    A simulated client is named by its partition id: ``names[pid]`` (the run's client
    names, `fedlora.data.client_names`), or the id itself where ``names`` has none. A
    deployed device, which sends no partition id, is ``node-<node id>``.
    """
    pid = partition_id(metrics)
    if pid is None:
        return f"node-{node}"
    return names[pid] if pid < len(names) else str(pid)


def client_of(message: Message, names: Sequence[str] = ()) -> str:
    """The name in results of the client that sent ``message`` (`client_id`)."""
    return client_id(metrics_of(message), message.metadata.src_node_id, names)


def order_key(message: Message) -> tuple[float, int]:
    """Sort key that puts replies in client order: partition id, then node (errors last)."""
    pid = metric(message, keys.M_PARTITION_ID) if not message.has_error() else math.nan
    return (math.inf if math.isnan(pid) else pid, message.metadata.src_node_id)


def error_reason(message: Message) -> str:
    """An error reply's reason as results record it: one line, at most ``MAX_REASON`` characters."""
    reason = " ".join(str(message.error.reason).split())
    return reason if len(reason) <= MAX_REASON else reason[: MAX_REASON - 3] + "..."
