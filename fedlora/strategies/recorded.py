"""A strategy wrapper that measures what crosses the wire and collects per-client metrics."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedlora import keys
from fedlora.results import RoundRecord, RunRecorder, perplexity, worst_fraction_mean

if TYPE_CHECKING:
    from fedlora.adapters import AdapterState
    from fedlora.validation import UploadCheck

__all__ = ["Recorded", "client_id", "record_evaluation"]

log = logging.getLogger(__name__)


def _metrics(message: Message) -> Mapping[str, Any]:
    return message.content.metric_records.get(keys.METRICS) or {}


def _value(metrics: Mapping[str, Any], key: str) -> float:
    value = metrics.get(key)
    return float(value) if isinstance(value, (int, float)) else math.nan


def _metric(message: Message, key: str) -> float:
    return _value(_metrics(message), key)


def client_id(metrics: Mapping[str, Any], node: int | str) -> str:
    """A client's name in results: its partition id, else its node id."""
    pid = _value(metrics, keys.M_PARTITION_ID)
    return str(int(pid)) if not math.isnan(pid) else f"node-{node}"


def _client_id(message: Message) -> str:
    return client_id(_metrics(message), message.metadata.src_node_id)


def _client_key(message: Message) -> float:
    # Sort key: the partition id (errors and unnamed clients last).
    pid = _metric(message, keys.M_PARTITION_ID) if not message.has_error() else math.nan
    return math.inf if math.isnan(pid) else pid


class Recorded(Strategy):
    """Wrap any strategy: count bytes down/up, and record per-client accuracies each round.

    Parameters
    ----------
    strategy : Strategy
        The strategy that samples and aggregates; every call is delegated to it.
    recorder : RunRecorder
        Where round metrics go.

    """

    def __init__(
        self,
        strategy: Strategy,
        recorder: RunRecorder,
        check: UploadCheck | None = None,
        *,
        first_round: int = 1,
        min_reply_fraction: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.strategy = strategy
        self.recorder = recorder
        self.check = check
        # A resumed run: Flower counts its rounds from 1, the run goes on from ``first_round``.
        self.offset = first_round - 1
        self.min_reply_fraction = min_reply_fraction
        self.seed = seed
        self.sampled: dict[int, int] = {}
        self.round_start: AdapterState = {}
        # Client-level DP: rounds the accountant refused (the budget would be exceeded).
        self.refused: set[int] = set()

    def _count_down(self, server_round: int, messages: Iterable[Message], *, train: bool) -> list[Message]:
        messages = list(messages)
        record = self.recorder.round(server_round)
        sent = sum(ar.count_bytes() for m in messages for ar in m.content.array_records.values())
        record.bytes_down += sent
        if train:
            record.bytes_down_train += sent
            record.clients_sampled += len(messages)
        return messages

    def summary(self) -> None:
        """Delegate to the wrapped strategy."""
        self.strategy.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate, and count the bytes sent down to the sampled clients.

        Under client-level DP, a round whose release would exceed the budget is not
        trained: the run goes on evaluating (and personalizing) with the last global arrays.
        """
        import random

        from flwr.serverapp.exception import PrivacyBudgetExhausted

        server_round += self.offset
        # Flower samples with the global `random`: seed it per round, so a resumed run samples alike.
        random.seed(self.seed * 1_000_003 + server_round)
        if self.check is not None and self.check.max_norm != math.inf:
            from fedlora.adapters import from_record

            self.round_start = from_record(arrays)
        try:
            messages = self.strategy.configure_train(server_round, arrays, config, grid)
        except PrivacyBudgetExhausted as err:
            self.refused.add(server_round)
            self.recorder.event("client-dp-budget-exhausted", round=server_round, reason=str(err))
            return []
        messages = self._count_down(server_round, messages, train=True)
        self.sampled[server_round] = len(messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Count what each client uploaded, then delegate the aggregation.

        Replies are aggregated in client order, so that the result does not depend on
        which client answered first. A client that did not answer within the round's
        timeout counts as failed; with fewer valid updates than ``min_reply_fraction``
        of those sampled, the global arrays stay as they were.
        """
        server_round += self.offset
        replies = sorted(list(replies), key=lambda m: (_client_key(m), m.metadata.src_node_id))
        sampled = self.sampled.get(server_round, len(replies))
        missing = max(0, sampled - len(replies))
        replies = self._drop_invalid(server_round, replies)
        record = self.recorder.round(server_round)
        ok = [m for m in replies if not m.has_error()]
        record.clients_trained = len(ok)
        record.clients_failed = len(replies) - len(ok) + record.clients_rejected + missing
        if missing:
            self.recorder.event("clients-missing", round=server_round, missing=missing, sampled=sampled)
        record.bytes_up = sum(ar.count_bytes() for m in ok for ar in m.content.array_records.values())
        losses = [_metric(m, keys.M_TRAIN_LOSS) for m in ok]
        record.train_loss = sum(losses) / len(losses) if losses else math.nan
        for m in replies:
            if m.has_error():
                self.recorder.event(
                    "client-error", round=server_round, node=m.metadata.src_node_id, reason=m.error.reason
                )
        if server_round in self.refused:
            return None, None
        if sampled and len(ok) < self.min_reply_fraction * sampled:
            log.warning(
                "fedlora: round %d: %d of %d sampled clients sent a valid update, fewer than "
                "min-reply-fraction %g; the global adapter is kept",
                server_round,
                len(ok),
                sampled,
                self.min_reply_fraction,
            )
            self.recorder.event("round-not-aggregated", round=server_round, valid=len(ok), sampled=sampled)
            return None, None
        result = self.strategy.aggregate_train(server_round, replies)
        spent = getattr(self.strategy, "privacy_spent", lambda: None)()
        if spent is not None:
            record.client_dp_epsilon = float(spent.epsilon)
        return result

    def _drop_invalid(self, server_round: int, replies: list[Message]) -> list[Message]:
        """Leave out every upload the check rejects, logging which node and why."""
        if self.check is None:
            return replies
        from fedlora.adapters import from_record

        kept, rejected = [], 0
        for m in replies:
            reason = None
            if not m.has_error():
                arrays = m.content.array_records.get(keys.ARRAYS)
                reason = (
                    "no adapter tensors"
                    if arrays is None
                    else self.check.problem(from_record(arrays), self.round_start)
                )
            if reason is None:
                kept.append(m)
                continue
            rejected += 1
            node = m.metadata.src_node_id
            log.warning(
                "fedlora: round %d: rejected the update of node %s (client %s): %s",
                server_round,
                node,
                _client_id(m),
                reason,
            )
            self.recorder.event(
                "client-rejected", round=server_round, node=node, client=_client_id(m), reason=reason
            )
        self.recorder.round(server_round).clients_rejected = rejected
        return kept

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate, and count the bytes sent down for evaluation."""
        server_round += self.offset
        return self._count_down(
            server_round, self.strategy.configure_evaluate(server_round, arrays, config, grid), train=False
        )

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Record every client's global and personalized accuracy, then delegate."""
        server_round += self.offset
        replies = list(replies)
        ok = [m for m in replies if not m.has_error()]
        record_evaluation(
            self.recorder.round(server_round),
            [(_client_id(m), _metrics(m)) for m in ok],
            self.recorder.task,
        )
        return self.strategy.aggregate_evaluate(server_round, replies)


def record_evaluation(
    record: RoundRecord, clients: Sequence[tuple[str, Mapping[str, Any]]], task: str = "classification"
) -> None:
    """Fill ``record`` from each client's evaluation metrics: ``(client id, metrics)`` pairs.

    For causal LMs the round's perplexities are recorded too.
    """
    record.per_client = {
        cid: {
            "global_accuracy": _value(m, keys.M_ACCURACY_GLOBAL),
            "personalized_accuracy": _value(m, keys.M_ACCURACY_PERSONALIZED),
            "num_test_examples": _value(m, keys.M_NUM_EXAMPLES),
            "personal_rounds": _value(m, keys.M_PERSONAL_ROUNDS),
            "global_loss": _value(m, keys.M_LOSS_GLOBAL),
            "personalized_loss": _value(m, keys.M_LOSS_PERSONALIZED),
            # With DP: epsilon spent so far, and whether the next round would break the budget.
            **(
                {
                    "epsilon": _value(m, keys.M_EPSILON),
                    "budget_exhausted": bool(_value(m, keys.M_BUDGET_EXHAUSTED) == 1),
                }
                if not math.isnan(_value(m, keys.M_EPSILON))
                else {}
            ),
            # Final round: membership-inference advantage against the global / personalized model.
            **(
                {
                    "mia_advantage_global": _value(m, keys.M_MIA_GLOBAL),
                    "mia_advantage_personalized": _value(m, keys.M_MIA_PERSONALIZED),
                    "mia_advantage_chance": _value(m, keys.M_MIA_CHANCE),
                }
                if keys.M_MIA_GLOBAL in m
                else {}
            ),
            **(
                {
                    "canary_exposure_global": _value(m, keys.M_CANARY_GLOBAL),
                    "canary_exposure_personalized": _value(m, keys.M_CANARY_PERSONALIZED),
                }
                if not math.isnan(_value(m, keys.M_CANARY_GLOBAL))
                else {}
            ),
        }
        for cid, m in clients
    }
    for name in (
        "mia_advantage_global",
        "mia_advantage_personalized",
        "mia_advantage_chance",
        "canary_exposure_global",
        "canary_exposure_personalized",
    ):
        values = [c[name] for c in record.per_client.values() if name in c and not math.isnan(c[name])]
        setattr(record, name, sum(values) / len(values) if values else math.nan)
    spent = [c["epsilon"] for c in record.per_client.values() if "epsilon" in c]
    record.epsilon_max = max(spent) if spent else math.nan
    glob = [c["global_accuracy"] for c in record.per_client.values()]
    pers = [c["personalized_accuracy"] for c in record.per_client.values()]
    # Personalization papers report the unweighted mean over clients: every user counts once.
    record.global_accuracy = sum(glob) / len(glob) if glob else math.nan
    record.personalized_accuracy = sum(pers) / len(pers) if pers else math.nan
    record.global_accuracy_worst10 = worst_fraction_mean(glob)
    if task == "causal-lm":
        record.global_perplexity = perplexity([c["global_loss"] for c in record.per_client.values()])
        record.personalized_perplexity = perplexity(
            [c["personalized_loss"] for c in record.per_client.values()]
        )
    record.personalized_accuracy_worst10 = worst_fraction_mean(pers)
