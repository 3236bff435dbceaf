"""The run directory: resolved config, per-round metrics, checkpoints and the final summary."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fedlora.core.rundir import (
    CHECKPOINT,
    CONFIG,
    GLOBAL_ADAPTER,
    METRICS,
    SUMMARY,
    ClientsSummary,
    FinalSummary,
    RoundRecord,
    RoundSummary,
    RunSummary,
    summary_text,
)
from fedlora.core.stats import Gain, verdicts

__all__ = [
    "CHECKPOINT",
    "GLOBAL_ADAPTER",
    "RoundRecord",
    "RunRecorder",
    "perplexity",
    "worst_fraction_mean",
    "worst_perplexity",
]


def worst_fraction_mean(values: Sequence[float], fraction: float = 0.1) -> float:
    """Mean of the worst ``ceil(fraction * n)`` values (at least one): the tail clients.

    >>> worst_fraction_mean([0.9, 0.5, 0.7, 0.8], 0.5)
    0.6
    """
    finite = sorted(v for v in values if not math.isnan(v))
    if not finite:
        return math.nan
    k = max(1, math.ceil(fraction * len(finite)))
    return sum(finite[:k]) / k


def perplexity(losses: Sequence[float]) -> float:
    """Mean over clients of each client's perplexity, ``exp(mean token loss)``."""
    finite = [math.exp(v) for v in losses if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def worst_perplexity(losses: Sequence[float], fraction: float = 0.1) -> float:
    """Mean perplexity of the worst ``ceil(fraction * n)`` clients (the highest; at least one).

    >>> round(worst_perplexity([0.0, math.log(4.0), math.log(2.0)], 0.5), 6)
    3.0
    """
    worst = [-v for v in (math.exp(v) for v in losses if not math.isnan(v))]
    return -worst_fraction_mean(worst, fraction)


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _last_finite(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return finite[-1] if finite else math.nan


class RunRecorder:
    """Collects round metrics from the strategy and writes the run directory as it goes.

    Every write is a whole file or one appended line, so a reader (the CLI's progress
    display) never sees half a record. ``names`` gives the simulated clients' names by
    partition id (`fedlora.data.client_names`); it is called once, when a client is first
    named (by then the simulated nodes are all known). Without it, clients are named by
    their partition id.
    """

    def __init__(
        self,
        out_dir: Path,
        config: dict[str, Any],
        *,
        full_model_bytes: int,
        rounds: dict[int, RoundRecord] | None = None,
        wall_s: float = 0.0,
        names: Callable[[], Sequence[str]] | None = None,
    ) -> None:
        self.out_dir = out_dir
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.full_model_bytes = full_model_bytes
        self.task = str(config.get("task", "classification"))
        # A resumed run goes on from the rounds (and wall time) of its checkpoint.
        self.rounds: dict[int, RoundRecord] = dict(rounds or {})
        self.local_only: dict[str, float] = {}
        self.local_only_loss: dict[str, float] = {}
        self.local_only_gain: dict[str, Gain] = {}
        self._name_clients = names
        self._names: tuple[str, ...] | None = None
        self._index: dict[str, int] | None = None  # name -> partition id
        self.started = time.perf_counter() - wall_s
        (out_dir / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
        if rounds is None or not (out_dir / METRICS).exists():
            (out_dir / METRICS).write_text("")

    @property
    def names(self) -> tuple[str, ...]:
        """The simulated clients' names, by partition id (empty: they are named by number)."""
        if self._names is None:
            self._names = tuple(self._name_clients()) if self._name_clients is not None else ()
        return self._names

    def partition(self, client: str) -> int | None:
        """The partition id of the client named ``client``; None for a deployed device (``node-<id>``)."""
        if self._index is None:
            self._index = {name: pid for pid, name in enumerate(self.names)}
        if client in self._index:
            return self._index[client]
        return int(client) if client.isascii() and client.isdigit() else None

    def elapsed(self) -> float:
        """Seconds of the run so far (across a resume)."""
        return time.perf_counter() - self.started

    def round(self, server_round: int) -> RoundRecord:
        """The record of ``server_round``, created on first use."""
        return self.rounds.setdefault(server_round, RoundRecord(server_round))

    def event(self, kind: str, **fields: Any) -> None:
        """Append one JSON line to ``metrics.jsonl``."""
        line = json.dumps({"event": kind, "t": round(time.perf_counter() - self.started, 3), **fields})
        with (self.out_dir / METRICS).open("a") as fh:
            fh.write(line + "\n")

    def end_round(self, server_round: int) -> None:
        """Stamp the round's wall time and log it."""
        record = self.round(server_round)
        record.wall_s = time.perf_counter() - self.started
        self.event("round", **{k: v for k, v in vars(record).items() if k != "per_client"})

    def _with_partitions(self, clients: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        # Each simulated client's record says its partition id, so that readers of ids find it;
        # simulated clients come in partition order, deployed devices after them.
        partitions = {name: pid for name in clients if (pid := self.partition(name)) is not None}
        simulated = sorted(partitions, key=partitions.__getitem__)
        devices = sorted(name for name in clients if name not in partitions)
        return {
            **{name: {"partition": partitions[name], **clients[name]} for name in simulated},
            **{name: clients[name] for name in devices},
        }

    def summary(
        self, *, labels: Sequence[str] = (), strategy: str = "", personalization: str = ""
    ) -> dict[str, Any]:
        """Write and return ``summary.json`` (`RunSummary.to_dict`)."""
        rounds = [self.rounds[r] for r in sorted(self.rounds)]
        last = rounds[-1] if rounds else RoundRecord(0)
        trained = sum(r.clients_trained for r in rounds)
        per_client = sum(r.bytes_up for r in rounds) / trained if trained else 0.0
        sampled = sum(r.clients_sampled for r in rounds)
        down_per_client = sum(r.bytes_down_train for r in rounds) / sampled if sampled else 0.0
        local_only = list(self.local_only.values())
        final = FinalSummary(
            global_accuracy=last.global_accuracy,
            global_accuracy_worst10=last.global_accuracy_worst10,
            personalized_accuracy=last.personalized_accuracy,
            personalized_accuracy_worst10=last.personalized_accuracy_worst10,
            local_only_accuracy=_mean(local_only) if local_only else None,
            local_only_accuracy_worst10=worst_fraction_mean(local_only) if local_only else None,
            global_perplexity=last.global_perplexity,
            personalized_perplexity=last.personalized_perplexity,
            global_perplexity_worst10=last.global_perplexity_worst10,
            personalized_perplexity_worst10=last.personalized_perplexity_worst10,
            local_only_perplexity=perplexity(list(self.local_only_loss.values())),
            local_only_perplexity_worst10=worst_perplexity(list(self.local_only_loss.values())),
            bytes_up_per_client_round=per_client,
            bytes_down_per_client_round=down_per_client,
            epsilon_max=last.epsilon_max,
            clients_out_of_budget=sum(bool(c.get("budget_exhausted")) for c in last.per_client.values()),
            client_dp_epsilon=_last_finite([r.client_dp_epsilon for r in rounds]),
            mia_advantage_global=last.mia_advantage_global,
            mia_advantage_personalized=last.mia_advantage_personalized,
            mia_advantage_chance=last.mia_advantage_chance,
            mia_examples=last.mia_examples,
            canary_exposure_global=last.canary_exposure_global,
            canary_exposure_personalized=last.canary_exposure_personalized,
            full_model_bytes=self.full_model_bytes,
            wall_s=time.perf_counter() - self.started,
            upload_reduction=self.full_model_bytes / per_client if per_client else None,
            personalized_vs_global=verdicts(
                Gain(c.get("gain_over_global", math.nan), c.get("gain_over_global_se", math.nan))
                for c in last.per_client.values()
            ),
            personalized_vs_local_only=verdicts(self.local_only_gain.values()),
            mix_weight=_mean([c["mix_weight"] for c in last.per_client.values() if "mix_weight" in c]),
        )
        record = RunSummary(
            rounds=[RoundSummary.of(r) for r in rounds],
            final=final,
            per_client=ClientsSummary(
                self._with_partitions(last.per_client),
                self.local_only,
                self.local_only_loss,
                {name: gain.mean for name, gain in self.local_only_gain.items()},
                {name: gain.se for name, gain in self.local_only_gain.items()},
            ),
            labels=list(labels),
            strategy=strategy,
            personalization=personalization,
        )
        summary = record.to_dict()
        tmp = self.out_dir / (SUMMARY + ".tmp")
        tmp.write_text(summary_text(summary))
        tmp.replace(self.out_dir / SUMMARY)
        self.event("done", summary=SUMMARY)
        return summary
