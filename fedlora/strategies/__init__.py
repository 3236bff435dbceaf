"""Aggregation strategies over the shared adapter: a registry of names to builders."""

from fedlora.strategies.fedavg import build_fedavg
from fedlora.strategies.recorded import Recorded
from fedlora.strategies.registry import STRATEGIES, StrategyBuilder, build_strategy

__all__ = ["STRATEGIES", "Recorded", "StrategyBuilder", "build_fedavg", "build_strategy"]
