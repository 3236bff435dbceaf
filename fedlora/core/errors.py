"""Error hierarchy: every error fedlora raises on purpose derives from `FedloraError`."""

from __future__ import annotations

import re

__all__ = [
    "BudgetExhausted",
    "ConfigError",
    "DataError",
    "FedloraError",
    "ModelError",
    "PairingError",
    "RegistryError",
    "RunInterrupted",
]


_KEY = re.compile(r"[a-z][a-z0-9-]*")


class FedloraError(Exception):
    """Root of every error fedlora raises on purpose.

    Parameters
    ----------
    message : str
        The whole message, for the log of the machine it happened on: it may name paths,
        values, labels.
    where : str, optional
        What may leave that machine: the field or file and line at fault, with no path or
        content (``"train.jsonl:3"``). By default the message's leading config key, if it
        has one (``"lora-rank: must be ..."`` -> ``"lora-rank"``).

    """

    def __init__(self, message: str = "", *, where: str | None = None) -> None:
        super().__init__(message)
        head = message.split(":", 1)[0]
        self.where = where if where is not None else (head if _KEY.fullmatch(head) else "")

    def public(self) -> str:
        """The error as a client may report it to the server: its kind and where, nothing more."""
        return f"{type(self).__name__}: {self.where}" if self.where else type(self).__name__


class ConfigError(FedloraError, ValueError):
    """A configuration value is missing, malformed or out of range."""


class PairingError(ConfigError):
    """A combination the methods' own rules exclude (e.g. ``fedsa-lora`` with ``ditto``, DP with ``fedprox``).

    Each setting is valid alone; a sweep over methods skips such combinations and says why.
    """


class DataError(FedloraError, ValueError):
    """Client data is missing, malformed or inconsistent with the configuration."""


class ModelError(FedloraError, ValueError):
    """A base model cannot be resolved or does not fit the task."""


class BudgetExhausted(FedloraError):
    """A client declines to train: its next round would take it past its epsilon budget."""

    def public(self) -> str:
        """The whole message: epsilon and the budget are what the client reports anyway."""
        return f"{type(self).__name__}: {self}"


class RunInterrupted(FedloraError):
    """A run stopped by SIGINT or SIGTERM: its processes are gone, and it can be resumed."""


class RegistryError(FedloraError, ValueError):
    """Two registrations claim one name: a programming error, found at import."""
