"""Differential privacy: DP-SGD with Opacus on the adapters, and a per-client epsilon ledger."""

from fedlora.privacy.ledger import ACCOUNTANTS, PrivacyLedger, noise_multiplier

__all__ = ["ACCOUNTANTS", "PrivacyLedger", "noise_multiplier"]
