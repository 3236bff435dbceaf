"""Reading client replies on the server: their metrics, and the client each one names."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from flwr.app import Message

from fedlora.core import keys

__all__ = ["client_id", "client_of", "error_reason", "metric", "metrics_of", "order_key", "value"]

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


def client_id(metrics: Mapping[str, Any], node: int | str) -> str:
    """A client's name in results: its partition id (a whole number from 0), else its node id."""
    pid = value(metrics, keys.M_PARTITION_ID)
    return str(int(pid)) if math.isfinite(pid) and pid >= 0 and pid == int(pid) else f"node-{node}"


def client_of(message: Message) -> str:
    """The name in results of the client that sent ``message``."""
    return client_id(metrics_of(message), message.metadata.src_node_id)


def order_key(message: Message) -> tuple[float, int]:
    """Sort key that puts replies in client order: partition id, then node (errors last)."""
    pid = metric(message, keys.M_PARTITION_ID) if not message.has_error() else math.nan
    return (math.inf if math.isnan(pid) else pid, message.metadata.src_node_id)


def error_reason(message: Message) -> str:
    """An error reply's reason as results record it: one line, at most ``MAX_REASON`` characters."""
    reason = " ".join(str(message.error.reason).split())
    return reason if len(reason) <= MAX_REASON else reason[: MAX_REASON - 3] + "..."
