"""Error hierarchy: every error fedlora raises on purpose derives from `FedloraError`."""

from __future__ import annotations

__all__ = ["BudgetExhausted", "ConfigError", "DataError", "FedloraError", "ModelError", "RegistryError"]


class FedloraError(Exception):
    """Root of every error fedlora raises on purpose."""


class ConfigError(FedloraError, ValueError):
    """A configuration value is missing, malformed or out of range."""


class DataError(FedloraError, ValueError):
    """Client data is missing, malformed or inconsistent with the configuration."""


class ModelError(FedloraError, ValueError):
    """A base model cannot be resolved or does not fit the task."""


class BudgetExhausted(FedloraError):
    """A client declines to train: its next round would take it past its epsilon budget."""


class RegistryError(FedloraError, ValueError):
    """Two registrations claim one name: a programming error, found at import."""
