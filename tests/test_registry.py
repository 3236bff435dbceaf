"""The registry type: unique names, lookups that name the config key and list the choices."""

from __future__ import annotations

import pytest

from fedlora.core.errors import ConfigError, RegistryError
from fedlora.core.registry import Registry
from fedlora.data import DATASETS
from fedlora.personalization import PERSONALIZATIONS
from fedlora.strategies import STRATEGIES


def test_a_name_registered_twice_is_refused():
    registry: Registry[int] = Registry("widget")
    registry.add("a", 1)
    with pytest.raises(RegistryError, match=r"^widget: 'a' is registered twice$"):
        registry.add("a", 2)
    assert registry.get("a") == 1


def test_an_unknown_name_names_the_key_and_the_choices():
    registry: Registry[int] = Registry("widget")
    registry.add("b", 2)
    registry.add("a", 1)
    with pytest.raises(ConfigError, match=r"^widget: must be one of a, b, got 'c'$"):
        registry.get("c")
    assert registry.names() == ["a", "b"] and list(registry) == ["a", "b"] and len(registry) == 2
    assert "a" in registry and "c" not in registry


def test_the_method_and_data_registries_refuse_a_second_registration():
    from fedlora.personalization.base import register as register_personalization
    from fedlora.personalization.dual import Dual
    from fedlora.strategies.fedavg import build_fedavg
    from fedlora.strategies.registry import register as register_strategy

    with pytest.raises(RegistryError, match="strategy: 'fedavg' is registered twice"):
        register_strategy("fedavg")(build_fedavg)
    with pytest.raises(RegistryError, match="personalization: 'dual' is registered twice"):
        register_personalization(Dual)
    assert STRATEGIES.key == "strategy" and PERSONALIZATIONS.key == "personalization"
    assert DATASETS.names() == ["bbc-news", "shakespeare", "shakespeare-chat"]
