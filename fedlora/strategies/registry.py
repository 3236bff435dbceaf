"""Strategy registry: each strategy module registers a builder under its config name."""

from __future__ import annotations

from collections.abc import Callable

from flwr.serverapp.strategy import Strategy

from fedlora.config import RunConfig
from fedlora.errors import ConfigError

__all__ = ["STRATEGIES", "StrategyBuilder", "build_strategy", "register"]

StrategyBuilder = Callable[[RunConfig], Strategy]
STRATEGIES: dict[str, StrategyBuilder] = {}


def register(name: str) -> Callable[[StrategyBuilder], StrategyBuilder]:
    """Decorator: make a builder available as ``strategy=<name>``."""

    def wrap(builder: StrategyBuilder) -> StrategyBuilder:
        STRATEGIES[name] = builder
        return builder

    return wrap


def build_strategy(name: str, cfg: RunConfig) -> Strategy:
    """Build the strategy registered as ``name``.

    Raises
    ------
    ConfigError
        If no strategy has that name.

    """
    try:
        builder = STRATEGIES[name]
    except KeyError:
        raise ConfigError(f"strategy: must be one of {', '.join(sorted(STRATEGIES))}, got {name!r}") from None
    return builder(cfg)
