"""Strategy registry: each strategy module registers a builder and its properties under a name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from flwr.serverapp.strategy import Strategy

from fedlora.errors import ConfigError
from fedlora.protocol import ClientProtocol

if TYPE_CHECKING:
    from fedlora.config import RunConfig

__all__ = ["STRATEGIES", "StrategyBuilder", "StrategyInfo", "build_strategy", "register", "strategy_info"]

StrategyBuilder = Callable[["RunConfig"], Strategy]


@dataclass(frozen=True)
class StrategyInfo:
    """A registered strategy: how to build it and what a researcher needs to know about it.

    Attributes
    ----------
    name : str
        The config value (``strategy=<name>``).
    builder : StrategyBuilder
        Builds the server-side Flower strategy from the run config.
    protocol : ClientProtocol
        What clients train, send and keep.
    paper : str
        Where the method comes from.
    exact : bool
        Whether the aggregated weight update equals the example-weighted mean of the
        clients' ``B_i A_i``.
    sum_only : bool
        Whether the server only needs a weighted sum of the uploads, so that secure
        aggregation can hide individual updates.
    plain_mean : bool
        Whether the server's new global arrays are exactly Flower FedAvg's mean of the
        uploads, which Flower's client-level DP wrappers can account for.
    summary : str
        One line for ``--help`` and the README.

    """

    name: str
    builder: StrategyBuilder
    protocol: ClientProtocol = field(default_factory=ClientProtocol)
    paper: str = ""
    exact: bool = False
    sum_only: bool = True
    plain_mean: bool = False
    summary: str = ""


STRATEGIES: dict[str, StrategyInfo] = {}


def register(
    name: str,
    *,
    protocol: ClientProtocol | None = None,
    paper: str = "",
    exact: bool = False,
    sum_only: bool = True,
    plain_mean: bool = False,
    summary: str = "",
) -> Callable[[StrategyBuilder], StrategyBuilder]:
    """Decorator: make a builder available as ``strategy=<name>``."""

    def wrap(builder: StrategyBuilder) -> StrategyBuilder:
        STRATEGIES[name] = StrategyInfo(
            name, builder, protocol or ClientProtocol(), paper, exact, sum_only, plain_mean, summary
        )
        return builder

    return wrap


def strategy_info(name: str) -> StrategyInfo:
    """The registered strategy ``name``.

    Raises
    ------
    ConfigError
        If no strategy has that name.

    """
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ConfigError(f"strategy: must be one of {', '.join(sorted(STRATEGIES))}, got {name!r}") from None


def build_strategy(name: str, cfg: RunConfig) -> Strategy:
    """Build the strategy registered as ``name`` for this run."""
    return strategy_info(name).builder(cfg)
