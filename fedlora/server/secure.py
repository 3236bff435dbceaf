"""The server's run under secure aggregation: Flower's SecAgg+ workflow on the legacy path.

Each strategy whose server needs nothing but the weighted sum of the uploads declares its
legacy Flower counterpart (`fedlora.strategies.registry.StrategyInfo.legacy`); this module
builds it, wraps it so that the run records what it was given (one aggregate per round,
never an individual upload), and runs every round through ``SecAggPlusWorkflow``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import flwr.server.strategy as legacy
import numpy as np
import torch
from flwr.app import Context
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid

from fedlora.config import RunConfig
from fedlora.core import keys
from fedlora.lora.adapters import AdapterState
from fedlora.privacy.secagg import NUM_SHARES, QUANTIZATION_LEVELS, RECONSTRUCTION_THRESHOLD, SECURE_EVENT
from fedlora.server.evaluation import record_evaluation
from fedlora.server.recorder import RunRecorder
from fedlora.server.replies import client_id
from fedlora.strategies import STRATEGIES

if TYPE_CHECKING:
    from flwr.common import EvaluateIns, EvaluateRes, FitIns, FitRes, Parameters, Scalar
    from flwr.server.client_manager import ClientManager
    from flwr.server.client_proxy import ClientProxy

__all__ = ["SeesOnlyAggregate", "legacy_strategy", "run_secure"]


def legacy_strategy(cfg: RunConfig, initial: AdapterState, **callbacks: Any) -> LegacyStrategy:
    """The legacy Flower strategy that plays ``cfg``'s strategy under SecAgg+."""
    fed = cfg.federation
    builder = STRATEGIES.get(fed.strategy).legacy
    if builder is None:
        raise ValueError(f"strategy {fed.strategy!r} has no secure-aggregation counterpart")
    class_name, extra = builder(cfg)
    return getattr(legacy, class_name)(
        fraction_fit=fed.fraction_train,
        fraction_evaluate=fed.fraction_evaluate,
        min_fit_clients=1,
        min_evaluate_clients=1,
        min_available_clients=fed.min_clients,
        initial_parameters=ndarrays_to_parameters([t.numpy() for t in initial.values()]),
        **callbacks,
        **extra,
    )


def _state(names: Sequence[str], parameters: Parameters) -> AdapterState:
    arrays = parameters_to_ndarrays(parameters)
    return OrderedDict(
        (n, torch.from_numpy(np.array(a, copy=True))) for n, a in zip(names, arrays, strict=True)
    )


def _metrics(res: FitRes | EvaluateRes) -> dict[str, Any]:
    return dict(res.metrics or {})


class SeesOnlyAggregate(LegacyStrategy):
    """Wrap a legacy strategy: record each round, and check it only ever gets the aggregate.

    SecAgg+ hands ``aggregate_fit`` one result per client, each carrying the same
    unmasked sum; this wrapper records how many distinct parameter vectors it was given
    (always 1), writes the round's checkpoint and collects per-client evaluation metrics.
    """

    def __init__(
        self,
        strategy: LegacyStrategy,
        names: Sequence[str],
        recorder: RunRecorder,
        save: Callable[[int, AdapterState], None],
    ) -> None:
        self.strategy = strategy
        self.names = list(names)
        self.recorder = recorder
        self.save = save
        self.latest: AdapterState | None = None

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        """Delegate."""
        return self.strategy.initialize_parameters(client_manager)

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """Delegate, and count what goes down to the sampled clients."""
        instructions = self.strategy.configure_fit(server_round, parameters, client_manager)
        record = self.recorder.round(server_round)
        record.clients_sampled = len(instructions)
        sent = sum(len(t) for _, ins in instructions for t in ins.parameters.tensors)
        record.bytes_down += sent
        record.bytes_down_train += sent
        return instructions

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Record that every result holds the same (aggregate) vector, then delegate."""
        distinct = {b"".join(res.parameters.tensors) for _, res in results}
        record = self.recorder.round(server_round)
        record.clients_trained, record.clients_failed = len(results), len(failures)
        losses = [float(_metrics(res).get(keys.M_TRAIN_LOSS, math.nan)) for _, res in results]
        record.train_loss = sum(losses) / len(losses) if losses else math.nan
        self.recorder.event(
            SECURE_EVENT, round=server_round, clients=len(results), distinct_uploads_seen=len(distinct)
        )
        parameters, metrics = self.strategy.aggregate_fit(server_round, results, failures)
        if parameters is not None:
            self.latest = _state(self.names, parameters)
            self.save(server_round, self.latest)
        return parameters, metrics

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        """Delegate, and count what goes down for evaluation."""
        instructions = self.strategy.configure_evaluate(server_round, parameters, client_manager)
        self.recorder.round(server_round).bytes_down += sum(
            len(t) for _, ins in instructions for t in ins.parameters.tensors
        )
        return instructions

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        """Record every client's accuracies and close the round."""
        record = self.recorder.round(server_round)
        record_evaluation(
            record,
            [
                (client_id(_metrics(res), proxy.cid, self.recorder.names), _metrics(res))
                for proxy, res in results
            ],
            self.recorder.task,
        )
        for failure in failures:
            self.recorder.event("client-error", round=server_round, reason=str(failure))
        self.recorder.end_round(server_round)
        return self.strategy.aggregate_evaluate(server_round, results, failures)

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        """Delegate (fedlora evaluates on the clients only)."""
        return self.strategy.evaluate(server_round, parameters)


def _fit_config(cfg: RunConfig) -> Callable[[int], dict[str, Scalar]]:
    def config(server_round: int) -> dict[str, Scalar]:
        return {keys.C_SERVER_ROUND: server_round, keys.C_PROXIMAL_MU: cfg.federation.proximal_mu}

    return config


def _evaluate_config(server_round: int) -> dict[str, Scalar]:
    return {keys.C_SERVER_ROUND: server_round}


def _no_metrics(results: list[tuple[int, Mapping[str, Scalar]]]) -> dict[str, Scalar]:
    # Per-client metrics are recorded by SeesOnlyAggregate; nothing to aggregate here.
    return {}


def run_secure(
    grid: Grid,
    context: Context,
    cfg: RunConfig,
    initial: AdapterState,
    recorder: RunRecorder,
    save: Callable[[int, AdapterState], None],
) -> AdapterState:
    """Run every round with SecAgg+ and return the final global arrays.

    Parameters
    ----------
    grid, context
        The ServerApp's grid and context.
    cfg : RunConfig
        The run's configuration (a ``sum_only`` strategy).
    initial : AdapterState
        What the server sends in round 1, in the order clients read it.
    recorder : RunRecorder
        Where round metrics and events go.
    save : callable
        ``save(server_round, arrays)`` writes a round's checkpoint.

    """
    strategy = SeesOnlyAggregate(
        legacy_strategy(
            cfg,
            initial,
            on_fit_config_fn=_fit_config(cfg),
            on_evaluate_config_fn=_evaluate_config,
            fit_metrics_aggregation_fn=_no_metrics,
            evaluate_metrics_aggregation_fn=_no_metrics,
        ),
        list(initial),
        recorder,
        save,
    )
    legacy = LegacyContext(
        context=context,
        config=ServerConfig(num_rounds=cfg.federation.num_server_rounds),
        strategy=strategy,
    )
    workflow = DefaultWorkflow(
        fit_workflow=SecAggPlusWorkflow(
            num_shares=NUM_SHARES,
            reconstruction_threshold=RECONSTRUCTION_THRESHOLD,
            clipping_range=cfg.privacy.secagg_clipping_range,
            max_weight=cfg.privacy.secagg_max_weight,
            quantization_range=QUANTIZATION_LEVELS,
        )
    )
    workflow(grid, legacy)
    return strategy.latest if strategy.latest is not None else initial
