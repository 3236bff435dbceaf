"""Personalization methods: one module per method, all in one registry."""

from fedlora.personalization import ditto, dual, fedsa_lora, finetune, none  # noqa: F401  (registration)
from fedlora.personalization.base import PERSONALIZATIONS, Personalization, get_personalization

__all__ = ["PERSONALIZATIONS", "Personalization", "get_personalization"]
