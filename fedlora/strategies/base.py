"""What every fedlora strategy shares: Flower keyword arguments, a LoRA-aware FedAvg, checkpoints."""

from __future__ import annotations

import math
from abc import abstractmethod
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedlora.core import keys
from fedlora.lora.maths import base_deltas, lora_modules, part_of

if TYPE_CHECKING:
    import torch

    from fedlora.config import RunConfig
    from fedlora.lora.adapters import AdapterState
    from fedlora.strategies.registry import StrategyInfo
from fedlora.lora.adapters import from_record, to_record

__all__ = ["LoraAggregation", "checkpoint_state", "flower_kwargs", "initial_record", "legacy_fedavg"]


def flower_kwargs(cfg: RunConfig) -> dict[str, Any]:
    """Keyword arguments every Flower strategy takes: sampling, record keys, weighting."""
    fed = cfg.federation
    return {
        "fraction_train": fed.fraction_train,
        "fraction_evaluate": fed.fraction_evaluate,
        "min_train_nodes": 1,
        "min_evaluate_nodes": 1,
        "min_available_nodes": fed.min_clients,
        # Client-level DP averages clipped updates uniformly (DP-FedAvg); otherwise by examples.
        "weighted_by_key": keys.M_UNIT_WEIGHT if cfg.privacy.client_level else keys.M_NUM_EXAMPLES,
        "arrayrecord_key": keys.ARRAYS,
        "configrecord_key": keys.CONFIG,
    }


def legacy_fedavg(cfg: RunConfig) -> tuple[str, dict[str, Any]]:
    """The SecAgg+ counterpart of every strategy that is FedAvg on the server: legacy FedAvg."""
    return "FedAvg", {}


class LoraAggregation(FedAvg):
    """FedAvg's sampling and messages, with an aggregation that sees whole LoRA adapters.

    Subclasses implement `combine`: from the clients' uploaded states, their weights and
    the current global arrays, return the next global arrays (adapter tensors and
    ``base-delta`` updates for the clients' frozen weights).

    Parameters
    ----------
    cfg : RunConfig
        The run's configuration.

    """

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(**flower_kwargs(cfg))
        self.alpha = float(cfg.model.lora_alpha)
        self.current: AdapterState = OrderedDict()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the global arrays this round starts from, then sample as FedAvg does."""
        self.current = from_record(arrays)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Decode every valid upload and `combine` them, weighted by training examples."""
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        contents = [m.content for m in valid]
        states = [from_record(c[self.arrayrecord_key]) for c in contents]  # type: ignore[arg-type]
        weights = [float(c.metric_records[keys.METRICS][self.weighted_by_key]) for c in contents]  # type: ignore[arg-type]
        combined = self.combine(states, weights, self.current)
        return to_record(combined), self.train_metrics_aggr_fn(contents, self.weighted_by_key)

    @abstractmethod
    def combine(
        self, states: Sequence[AdapterState], weights: Sequence[float], current: AdapterState
    ) -> AdapterState:
        """The next global arrays from the clients' uploads (``weights``: training examples)."""


def initial_record(info: StrategyInfo, initial_global: AdapterState) -> AdapterState:
    """What the server sends in round 1: the seeded initial adapter, only the parts the strategy shares.

    Strategies whose updates arrive factored or folded into the base weights start from a
    zero update, so only the task head is sent.
    """
    protocol = info.protocol
    parts = {"head"} if protocol.fresh or protocol.factored else set(protocol.sent)
    return OrderedDict((k, v) for k, v in initial_global.items() if part_of(k) in parts)


def checkpoint_state(
    arrays: AdapterState, initial_global: AdapterState, *, factored: bool, alpha: float
) -> tuple[AdapterState, dict[str, torch.Tensor], int | None]:
    """A global round's arrays as a complete PEFT adapter, plus any update for the base weights.

    Returns ``(adapter_state, base_delta, rank)``: parts the server does not hold come from
    the seeded initial adapter; ``base_delta`` maps module names to dense (d_out, d_in)
    updates; ``rank`` is the adapter's rank when it differs from the configured one
    (factored strategies), else None.
    """
    adapter = {k: v for k, v in arrays.items() if part_of(k) != "base-delta"}
    rank = None
    if factored and lora_modules(adapter):
        # (alpha/R) * B @ A must equal the factors' product: split sqrt(alpha/R) off each.
        rank = int(adapter[lora_modules(adapter)[0] + ".lora_A.weight"].shape[0])
        root = math.sqrt(alpha / rank)
        adapter = {k: v / root if part_of(k) != "head" else v for k, v in adapter.items()}
    state: AdapterState = OrderedDict((k, adapter.get(k, v)) for k, v in initial_global.items())
    return state, base_deltas(arrays), rank
