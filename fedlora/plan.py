"""The plan of a run: the methods a config names, resolved, and every rule between them.

`fedlora.config` checks each key and the rules between keys; this module resolves the
names (strategy, personalization, dataset, partitioner) in their registries and applies
every rule that depends on what a method is, from the metadata the method registered.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

from fedlora.config import RunConfig, Scalar
from fedlora.core.errors import ConfigError, PairingError
from fedlora.data import DATASETS, PARTITIONERS
from fedlora.personalization import PERSONALIZATIONS, Personalization
from fedlora.strategies import STRATEGIES, StrategyInfo

__all__ = ["AUTO", "Plan", "load", "resolve", "resolved_personalization"]

# ``personalization=auto``: the strategy's own method if it has one, else this.
AUTO, DEFAULT_PERSONALIZATION = "auto", "dual"


@dataclass(frozen=True)
class Plan:
    """A run configuration with its methods resolved and checked against each other."""

    cfg: RunConfig
    strategy: StrategyInfo
    personalization: type[Personalization]

    @property
    def personalization_name(self) -> str:
        """The personalization in use (``auto`` resolved)."""
        return self.personalization.name


def resolved_personalization(cfg: RunConfig) -> str:
    """The personalization in use: ``auto`` is the strategy's own method if it has one, else ``dual``.

    Raises
    ------
    ConfigError
        If the strategy is not registered.

    """
    chosen = cfg.federation.personalization
    if chosen != AUTO:
        return chosen
    return STRATEGIES.get(cfg.federation.strategy).personalization or DEFAULT_PERSONALIZATION


def _choices(flag: str) -> str:
    return ", ".join(name for name, info in STRATEGIES.items() if getattr(info, flag))


def _check_names(cfg: RunConfig) -> None:
    data = cfg.data
    if not data.data_dir and not data.hf_dataset and data.dataset not in DATASETS:
        raise ConfigError(
            f"dataset: must be one of {', '.join(DATASETS.names())}, or hf:NAME (a Hugging Face dataset), "
            f"got {data.dataset!r}"
        )
    if data.partitioner not in PARTITIONERS:
        raise ConfigError(
            f"partitioner: must be one of {', '.join(sorted(PARTITIONERS))}, got {data.partitioner!r}"
        )
    STRATEGIES.get(cfg.federation.strategy)
    chosen = cfg.federation.personalization
    if chosen != AUTO and chosen not in PERSONALIZATIONS:
        raise ConfigError(
            f"personalization: must be auto or one of {', '.join(PERSONALIZATIONS.names())}, got {chosen!r}"
        )


def _check_pairing(strategy: StrategyInfo, method: type[Personalization], cfg: RunConfig) -> None:
    # A strategy made for one method, or a method made for one strategy, needs the other.
    fed = cfg.federation
    for own in {strategy.personalization, method.strategy} - {None}:
        if (strategy.name == own) != (method.name == own):
            raise PairingError(
                f"personalization: {fed.personalization!r} does not fit strategy {fed.strategy!r}; "
                f"{own} as either needs {own} (or auto) as the other"
            )


def _check_privacy(strategy: StrategyInfo, method: type[Personalization], cfg: RunConfig) -> None:
    privacy, fed = cfg.privacy, cfg.federation
    if cfg.model.quantization != "none" and strategy.protocol.base_update:
        updating = ", ".join(s.name for s in STRATEGIES.values() if s.protocol.base_update)
        raise PairingError(
            f"quantization: strategy {fed.strategy!r} adds dense updates to the frozen base weights, which "
            f"a {cfg.model.quantization} base cannot take; use quantization=none or a strategy other than "
            f"{updating}"
        )
    if privacy.enabled and cfg.model.precision != "fp32":
        raise ConfigError(
            f"precision: DP-SGD clips per-example gradients computed in float32; use precision=fp32 "
            f"(base-dtype=bfloat16 still halves the base's memory), got {cfg.model.precision!r}"
        )
    if privacy.enabled and cfg.train.micro_batch_size:
        raise ConfigError(
            "micro-batch-size: DP-SGD draws a Poisson batch per step and clips each example's gradient; "
            "gradient accumulation is not available with it (set micro-batch-size=0)"
        )
    if cfg.model.client_ranks and not strategy.protocol.heterogeneous_ranks:
        raise PairingError(
            f"client-ranks: per-client ranks need strategy {' or '.join(_heterogeneous())} "
            f"(one rank for all: lora-rank), got {fed.strategy!r}"
        )
    if privacy.client_level and not strategy.plain_mean:
        raise PairingError(
            f"client-dp: client-level DP needs a strategy whose server takes the plain mean of "
            f"the uploads ({_choices('plain_mean')}), got {fed.strategy!r}"
        )
    if privacy.secure_aggregation and not strategy.sum_only:
        raise PairingError(
            f"secure-aggregation: the server sees only the sum of the uploads, which strategy "
            f"{fed.strategy!r} cannot work from; use one of {_choices('sum_only')}"
        )
    # A regulariser's gradient bypasses DP-SGD's per-example clipping: not combined yet.
    regularized = strategy.protocol.proximal or (method.regularized and privacy.dp_personal)
    if privacy.enabled and regularized:
        raise PairingError(
            f"dp-noise-multiplier: DP-SGD is not yet available with strategy {fed.strategy!r} and "
            f"personalization {method.name!r} (fedprox and ditto add a regulariser); "
            "use another strategy or personalization, dp-personal=false with ditto, or turn DP off"
        )


def _check_mixing(method: type[Personalization], cfg: RunConfig) -> None:
    if cfg.train.personal_mix != "off" and not method.mixable:
        mixable = ", ".join(name for name, m in PERSONALIZATIONS.items() if m.mixable)
        raise PairingError(
            f"personal-mix: personalization {method.name!r} predicts through per-input weights that "
            f"personal-mix cannot mix yet; use personal-mix=off, or one of {mixable}"
        )


def _heterogeneous() -> list[str]:
    # Strategies whose clients may use different LoRA ranks.
    return [name for name, info in STRATEGIES.items() if info.protocol.heterogeneous_ranks]


@lru_cache(maxsize=16)
def resolve(cfg: RunConfig) -> Plan:
    """Resolve the methods ``cfg`` names and check every rule between them (once per configuration).

    Raises
    ------
    ConfigError
        One line naming the key at fault and what it accepts.

    """
    _check_names(cfg)
    strategy = STRATEGIES.get(cfg.federation.strategy)
    method = PERSONALIZATIONS.get(resolved_personalization(cfg))
    _check_pairing(strategy, method, cfg)
    _check_privacy(strategy, method, cfg)
    _check_mixing(method, cfg)
    return Plan(cfg, strategy, method)


def load(flat: Mapping[str, Scalar]) -> Plan:
    """`RunConfig.from_flat` followed by `resolve`: a flat run config, fully checked."""
    return resolve(RunConfig.from_flat(flat))
