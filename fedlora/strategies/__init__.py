"""Aggregation strategies over the shared adapter: one module per strategy, all in one registry."""

from fedlora.strategies import (  # noqa: F401  (each module registers its strategy)
    fedadam,
    fedavg,
    fedavgm,
    fedex_lora,
    fedmedian,
    fedprox,
    fedsa_lora,
    fedyogi,
    ffa_lora,
    flexlora,
    flora,
    krum,
    trimmed_mean,
)
from fedlora.strategies.recorded import Recorded
from fedlora.strategies.registry import (
    STRATEGIES,
    StrategyBuilder,
    StrategyInfo,
    build_strategy,
    strategy_info,
)

__all__ = ["STRATEGIES", "Recorded", "StrategyBuilder", "StrategyInfo", "build_strategy", "strategy_info"]
