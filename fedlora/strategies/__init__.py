"""Aggregation strategies over the shared adapter: one module per strategy, all in one registry.

Every module in this folder is imported here, so that a new strategy is one file that
registers itself (`fedlora.strategies.registry.register`).
"""

import importlib
import pkgutil

from fedlora.strategies.registry import (
    STRATEGIES,
    LegacyBuilder,
    StrategyBuilder,
    StrategyInfo,
    build_strategy,
    strategy_info,
)

__all__ = [
    "STRATEGIES",
    "LegacyBuilder",
    "StrategyBuilder",
    "StrategyInfo",
    "build_strategy",
    "strategy_info",
]

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
