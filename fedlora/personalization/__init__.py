"""Personalization methods: one module per method, all in one registry.

Every module in this folder is imported here, so that a new method is one file whose
class registers itself (`fedlora.personalization.base.register`).
"""

import importlib
import pkgutil

from fedlora.personalization.base import PERSONALIZATIONS, Local, Personalization, get_personalization

__all__ = ["PERSONALIZATIONS", "Local", "Personalization", "get_personalization"]

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
