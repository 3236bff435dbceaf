"""Strategy registry: each strategy module registers a builder and its properties under a name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flwr.serverapp.strategy import Strategy

from fedlora.core.registry import Registry
from fedlora.lora.protocol import ClientProtocol

if TYPE_CHECKING:
    from fedlora.config import RunConfig

__all__ = [
    "STRATEGIES",
    "LegacyBuilder",
    "StrategyBuilder",
    "StrategyInfo",
    "build_strategy",
    "register",
    "strategy_info",
]

# How the README groups strategies: FedAvg and its server optimizers, the strategies made
# for LoRA's factors, and the robust rules that compare individual uploads.
FAMILIES = ("fedavg", "lora", "robust")

StrategyBuilder = Callable[["RunConfig"], Strategy]
# Secure aggregation runs on Flower's legacy strategies: the class name in
# ``flwr.server.strategy`` and the keyword arguments that give it this run's hyperparameters.
LegacyBuilder = Callable[["RunConfig"], tuple[str, dict[str, Any]]]


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
    plain_mean : bool
        Whether the server's new global arrays are exactly Flower FedAvg's mean of the
        uploads, which Flower's client-level DP wrappers can account for.
    summary : str
        One line for ``--help``.
    description : str
        What the server does, for the README's strategy table (Markdown).
    exact_note : str
        Why the strategy is not exact, where that needs saying (README).
    family : str
        One of `FAMILIES`: where the README lists the strategy.
    legacy : LegacyBuilder or None
        The strategy's SecAgg+ counterpart, for strategies whose server needs nothing but
        the weighted sum of the uploads (see `sum_only`).
    personalization : str or None
        A personalization method this strategy is made for: ``auto`` resolves to it, and
        no other method may be combined with the strategy.

    """

    name: str
    builder: StrategyBuilder
    protocol: ClientProtocol = field(default_factory=ClientProtocol)
    paper: str = ""
    exact: bool = False
    plain_mean: bool = False
    summary: str = ""
    legacy: LegacyBuilder | None = None
    personalization: str | None = None
    description: str = ""
    exact_note: str = ""
    family: str = "fedavg"

    @property
    def sum_only(self) -> bool:
        """Whether the server only needs a weighted sum of the uploads (so SecAgg+ can hide them)."""
        return self.legacy is not None


STRATEGIES: Registry[StrategyInfo] = Registry("strategy")


def register(
    name: str,
    *,
    protocol: ClientProtocol | None = None,
    paper: str = "",
    exact: bool = False,
    plain_mean: bool = False,
    summary: str = "",
    legacy: LegacyBuilder | None = None,
    personalization: str | None = None,
    description: str = "",
    exact_note: str = "",
    family: str = "fedavg",
) -> Callable[[StrategyBuilder], StrategyBuilder]:
    """Decorator: make a builder available as ``strategy=<name>``.

    Raises
    ------
    RegistryError
        If another strategy already has that name.

    """
    if family not in FAMILIES:
        raise ValueError(f"strategy {name!r}: family must be one of {', '.join(FAMILIES)}, got {family!r}")

    def wrap(builder: StrategyBuilder) -> StrategyBuilder:
        info = StrategyInfo(
            name,
            builder,
            protocol or ClientProtocol(),
            paper,
            exact,
            plain_mean,
            summary,
            legacy,
            personalization,
            description,
            exact_note,
            family,
        )
        STRATEGIES.add(name, info)
        return builder

    return wrap


def strategy_info(name: str) -> StrategyInfo:
    """The registered strategy ``name``.

    Raises
    ------
    ConfigError
        If no strategy has that name.

    """
    return STRATEGIES.get(name)


def build_strategy(name: str, cfg: RunConfig) -> Strategy:
    """Build the strategy registered as ``name`` for this run."""
    return strategy_info(name).builder(cfg)
