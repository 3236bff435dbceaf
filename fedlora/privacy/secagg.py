"""Secure aggregation with Flower's SecAgg+ (Bell et al., CCS 2020) on the legacy workflow path.

Each sampled client masks its upload with pairwise and self masks (secret-shared among
its neighbours), after clipping every value to ``+-secagg-clipping-range`` and
quantizing it; the server adds the masked vectors and removes the masks, and so learns
only the example-weighted sum of the uploads. In Flower 1.42 this works only through
``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))`` with a legacy strategy, so each
strategy whose server needs nothing but that sum has a legacy counterpart here, with the
same hyperparameters as its Message-API builder. The strategy is wrapped so that the
run records what it was given: one aggregate per round, never an individual upload.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.server.strategy import Strategy as LegacyStrategy

from fedlora import keys

if TYPE_CHECKING:
    from flwr.app import Context
    from flwr.common import EvaluateIns, EvaluateRes, FitIns, FitRes, Parameters, Scalar
    from flwr.server.client_manager import ClientManager
    from flwr.server.client_proxy import ClientProxy
    from flwr.serverapp import Grid

    from fedlora.adapters import AdapterState
    from fedlora.config import RunConfig
    from fedlora.results import RunRecorder

__all__ = [
    "LEGACY_STRATEGIES",
    "QUANTIZATION_LEVELS",
    "SECURE_EVENT",
    "legacy_strategy",
    "quantization_bound",
    "run_secure",
]

# Event written to metrics.jsonl for every securely aggregated round.
SECURE_EVENT = "secure-aggregate"
# SecAgg+ neighbourhoods: each client's masks are shared with half of the sampled clients,
# and 70% of a neighbourhood can reconstruct a dropped client's mask.
NUM_SHARES, RECONSTRUCTION_THRESHOLD = 0.5, 0.7
# Flower's default quantization range: values in [-c, c] map to 2**22 integer levels.
QUANTIZATION_LEVELS = 2**22


def quantization_bound(weights: Sequence[float], clipping_range: float, max_weight: float) -> float:
    """Largest difference between the secure and the exact weighted mean, per value.

    Each client quantizes ``value * w_i / max_weight`` with step ``2c / (levels - 1)``
    (rounding error at most one step); the server divides the sum by ``sum(w_i) / max_weight``.
    """
    step = 2 * clipping_range / (QUANTIZATION_LEVELS - 1)
    return len(weights) * step * max_weight / sum(weights)


def _fedavg(cfg: RunConfig) -> tuple[str, dict[str, Any]]:
    return "FedAvg", {}


def _fedprox(cfg: RunConfig) -> tuple[str, dict[str, Any]]:
    return "FedProx", {"proximal_mu": cfg.federation.proximal_mu}


def _fedadam(cfg: RunConfig) -> tuple[str, dict[str, Any]]:
    # The Message-API FedAdam's defaults, made explicit (the legacy class has tau 1e-9).
    return "FedAdam", {"eta": cfg.federation.server_learning_rate or 0.01, "tau": 1e-3}


def _fedyogi(cfg: RunConfig) -> tuple[str, dict[str, Any]]:
    return "FedYogi", {"eta": cfg.federation.server_learning_rate or 0.01, "tau": 1e-3}


def _fedavgm(cfg: RunConfig) -> tuple[str, dict[str, Any]]:
    fed = cfg.federation
    return "FedAvgM", {
        "server_learning_rate": fed.server_learning_rate or 1.0,
        "server_momentum": fed.server_momentum,
    }


# Every strategy registered with ``sum_only=True``: its legacy Flower class and arguments.
LEGACY_STRATEGIES: dict[str, Callable[[RunConfig], tuple[str, dict[str, Any]]]] = {
    "fedavg": _fedavg,
    "ffa-lora": _fedavg,
    "fedsa-lora": _fedavg,
    "fedprox": _fedprox,
    "fedadam": _fedadam,
    "fedyogi": _fedyogi,
    "fedavgm": _fedavgm,
}


def legacy_strategy(cfg: RunConfig, initial: AdapterState, **callbacks: Any) -> LegacyStrategy:
    """The legacy Flower strategy that plays ``cfg``'s strategy under SecAgg+."""
    import flwr.server.strategy as legacy
    from flwr.common import ndarrays_to_parameters

    fed = cfg.federation
    class_name, extra = LEGACY_STRATEGIES[fed.strategy](cfg)
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
    import torch
    from flwr.common import parameters_to_ndarrays

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
        from fedlora.strategies.recorded import client_id, record_evaluation

        record = self.recorder.round(server_round)
        record_evaluation(
            record,
            [(client_id(_metrics(res), proxy.cid), _metrics(res)) for proxy, res in results],
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
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

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
