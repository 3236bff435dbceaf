"""Counting what crosses the wire: the bytes of the arrays in each message."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Message

from fedlora.core.rundir import RoundRecord

__all__ = ["array_bytes", "count_down"]


def array_bytes(messages: Iterable[Message]) -> int:
    """Bytes of every ArrayRecord in ``messages`` (what Flower serializes for the arrays)."""
    return sum(ar.count_bytes() for m in messages for ar in m.content.array_records.values())


def count_down(record: RoundRecord, messages: list[Message], *, train: bool) -> None:
    """Add what the server sends in ``messages`` to the round's record."""
    sent = array_bytes(messages)
    record.bytes_down += sent
    if train:
        record.bytes_down_train += sent
        record.clients_sampled += len(messages)
