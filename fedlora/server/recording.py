"""The federation's strategy wrapper: each round's bookkeeping around any Flower strategy.

`Recorded` delegates sampling and aggregation to the wrapped strategy and composes the
server's per-round jobs, each in its own module: seeding the sampling
(`fedlora.server.sampling`), counting traffic (`fedlora.server.traffic`), screening every
reply and capping each client's weight before the strategy sees it
(`fedlora.server.validation`), the reply quorum (`fedlora.server.quorum`),
client-level DP's budget refusal, recording evaluations (`fedlora.server.evaluation`),
and the round offset of a resumed run.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.serverapp.strategy import Strategy

from fedlora.core import keys
from fedlora.lora.adapters import AdapterState, from_record
from fedlora.server.evaluation import record_evaluation
from fedlora.server.quorum import Quorum
from fedlora.server.recorder import RunRecorder
from fedlora.server.replies import client_of, error_reason, metric, metrics_of, order_key
from fedlora.server.sampling import seed_sampling
from fedlora.server.schema import EVALUATE
from fedlora.server.traffic import array_bytes, count_down
from fedlora.server.validation import Owners, UploadCheck, for_strategy, screen_replies, screen_train

__all__ = ["Recorded"]

log = logging.getLogger(__name__)


class Recorded(Strategy):
    """Wrap any strategy: count bytes down/up, check uploads, and record every round.

    Parameters
    ----------
    strategy : Strategy
        The strategy that samples and aggregates; every call is delegated to it.
    recorder : RunRecorder
        Where round metrics go.
    check : UploadCheck, optional
        What a valid reply looks like; invalid ones are dropped before anything reads them.
    first_round : int
        The run's round that Flower's round 1 is (a resumed run goes on from there).
    min_reply_fraction : float
        The reply quorum (`Quorum`).
    seed : int
        The run's seed, for reproducible sampling.

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
        self.quorum = Quorum(min_reply_fraction)
        self.seed = seed
        self.sampled: dict[int, int] = {}
        self.round_start: AdapterState = {}
        self.owners = Owners()
        # Client-level DP: rounds the accountant refused (the budget would be exceeded).
        self.refused: set[int] = set()

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
        server_round += self.offset
        seed_sampling(self.seed, server_round)
        self.owners.num_partitions = max(1, len(list(grid.get_node_ids())))
        if self.check is not None:
            self.round_start = from_record(arrays)
        try:
            messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        except PrivacyBudgetExhausted as err:
            self.refused.add(server_round)
            self.recorder.event("client-dp-budget-exhausted", round=server_round, reason=str(err))
            return []
        count_down(self.recorder.round(server_round), messages, train=True)
        self.sampled[server_round] = len(messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Count what each client uploaded, then delegate the aggregation.

        Replies are aggregated in client order, so that the result does not depend on
        which client answered first. A client that did not answer within the round's
        timeout counts as failed; without the quorum of valid updates, the global arrays
        stay as they were.
        """
        server_round += self.offset
        replies = list(replies)
        sampled = self.sampled.get(server_round, len(replies))
        missing = max(0, sampled - len(replies))
        record = self.recorder.round(server_round)
        if self.check is not None:
            replies, record.clients_rejected = screen_train(
                self.check, replies, self.round_start, self.recorder, server_round, self.owners
            )
        replies = sorted(replies, key=order_key)
        ok = [m for m in replies if not m.has_error()]
        record.clients_trained = len(ok)
        record.clients_failed = len(replies) - len(ok) + record.clients_rejected + missing
        if missing:
            self.recorder.event("clients-missing", round=server_round, missing=missing, sampled=sampled)
        record.bytes_up = array_bytes(ok)
        losses = [metric(m, keys.M_TRAIN_LOSS) for m in ok]
        record.train_loss = sum(losses) / len(losses) if losses else math.nan
        for m in replies:
            if m.has_error():
                self.recorder.event(
                    "client-error", round=server_round, node=m.metadata.src_node_id, reason=error_reason(m)
                )
        if server_round in self.refused:
            return None, None
        if not self.quorum.met(len(ok), sampled):
            log.warning(
                "fedlora: round %d: %d of %d sampled clients sent a valid update, fewer than "
                "min-reply-fraction %g; the global adapter is kept",
                server_round,
                len(ok),
                sampled,
                self.quorum.min_reply_fraction,
            )
            self.recorder.event("round-not-aggregated", round=server_round, valid=len(ok), sampled=sampled)
            return None, None
        result = self.strategy.aggregate_train(
            server_round, for_strategy(self.check, replies, self.recorder, server_round)
        )
        spent = getattr(self.strategy, "privacy_spent", lambda: None)()
        if spent is not None:
            record.client_dp_epsilon = float(spent.epsilon)
        return result

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegate, and count the bytes sent down for evaluation."""
        server_round += self.offset
        messages = list(self.strategy.configure_evaluate(server_round, arrays, config, grid))
        count_down(self.recorder.round(server_round), messages, train=False)
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Record every client's global and personalized accuracy, then delegate."""
        server_round += self.offset
        replies, _ = screen_replies(
            self.check, list(replies), EVALUATE, server_round, self.recorder, self.owners
        )
        ok = [m for m in replies if not m.has_error()]
        record_evaluation(
            self.recorder.round(server_round),
            [(client_of(m, self.recorder.names), metrics_of(m)) for m in ok],
            self.recorder.task,
        )
        return self.strategy.aggregate_evaluate(
            server_round, for_strategy(self.check, replies, self.recorder, server_round, train=False)
        )
