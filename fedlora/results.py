"""The run directory: resolved config, per-round metrics, checkpoints and the final summary."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["CHECKPOINT", "GLOBAL_ADAPTER", "RoundRecord", "RunRecorder", "perplexity", "worst_fraction_mean"]

SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
CONFIG = "config.json"
GLOBAL_ADAPTER = "global_adapter"
CHECKPOINT = "checkpoint"


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


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


@dataclass
class RoundRecord:
    """What happened in one round, as written to ``metrics.jsonl`` and the summary."""

    round: int
    clients_trained: int = 0
    clients_failed: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    bytes_down_train: int = 0
    clients_sampled: int = 0
    train_loss: float = math.nan
    global_accuracy: float = math.nan
    personalized_accuracy: float = math.nan
    personalized_accuracy_worst10: float = math.nan
    global_accuracy_worst10: float = math.nan
    # Causal LMs: mean over clients of each client's held-out perplexity (exp of its token loss).
    global_perplexity: float = math.nan
    personalized_perplexity: float = math.nan
    per_client: dict[str, dict[str, float]] = field(default_factory=dict)
    epsilon_max: float = math.nan
    clients_rejected: int = 0
    client_dp_epsilon: float = math.nan
    mia_advantage_global: float = math.nan
    mia_advantage_personalized: float = math.nan
    mia_advantage_chance: float = math.nan
    canary_exposure_global: float = math.nan
    canary_exposure_personalized: float = math.nan
    wall_s: float = 0.0


def _last_finite(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return finite[-1] if finite else math.nan


class RunRecorder:
    """Collects round metrics from the strategy and writes the run directory as it goes.

    Every write is a whole file or one appended line, so a reader (the CLI's progress
    display) never sees half a record.
    """

    def __init__(
        self,
        out_dir: Path,
        config: dict[str, Any],
        *,
        full_model_bytes: int,
        rounds: dict[int, RoundRecord] | None = None,
        wall_s: float = 0.0,
    ) -> None:
        self.out_dir = out_dir
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.full_model_bytes = full_model_bytes
        self.task = str(config.get("task", "classification"))
        # A resumed run goes on from the rounds (and wall time) of its checkpoint.
        self.rounds: dict[int, RoundRecord] = dict(rounds or {})
        self.local_only: dict[str, float] = {}
        self.local_only_loss: dict[str, float] = {}
        self.started = time.perf_counter() - wall_s
        (out_dir / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
        if rounds is None or not (out_dir / METRICS).exists():
            (out_dir / METRICS).write_text("")

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

    def summary(self, **extra: Any) -> dict[str, Any]:
        """Write and return ``summary.json``."""
        rounds = [self.rounds[r] for r in sorted(self.rounds)]
        last = rounds[-1] if rounds else RoundRecord(0)
        trained = sum(r.clients_trained for r in rounds)
        per_client = sum(r.bytes_up for r in rounds) / trained if trained else 0.0
        sampled = sum(r.clients_sampled for r in rounds)
        down_per_client = sum(r.bytes_down_train for r in rounds) / sampled if sampled else 0.0
        final = {
            "global_accuracy": last.global_accuracy,
            "global_accuracy_worst10": last.global_accuracy_worst10,
            "personalized_accuracy": last.personalized_accuracy,
            "personalized_accuracy_worst10": last.personalized_accuracy_worst10,
            "local_only_accuracy": _mean(list(self.local_only.values())) if self.local_only else None,
            "local_only_accuracy_worst10": worst_fraction_mean(list(self.local_only.values()))
            if self.local_only
            else None,
            "global_perplexity": last.global_perplexity,
            "personalized_perplexity": last.personalized_perplexity,
            "local_only_perplexity": perplexity(list(self.local_only_loss.values())),
            "bytes_up_per_client_round": per_client,
            "bytes_down_per_client_round": down_per_client,
            "epsilon_max": last.epsilon_max,
            "clients_out_of_budget": sum(bool(c.get("budget_exhausted")) for c in last.per_client.values()),
            # Client-level DP: the server accountant's epsilon after the last release.
            "client_dp_epsilon": _last_finite([r.client_dp_epsilon for r in rounds]),
            # Loss-threshold membership inference on the final models (mean over clients).
            "mia_advantage_global": last.mia_advantage_global,
            "mia_advantage_personalized": last.mia_advantage_personalized,
            "mia_advantage_chance": last.mia_advantage_chance,
            # Canary audit (causal LMs): exposure in bits of the canary client's secret.
            "canary_exposure_global": last.canary_exposure_global,
            "canary_exposure_personalized": last.canary_exposure_personalized,
            "full_model_bytes": self.full_model_bytes,
            "wall_s": time.perf_counter() - self.started,
        }
        final["upload_reduction"] = self.full_model_bytes / per_client if per_client else None
        summary = {
            "rounds": [
                {
                    "round": r.round,
                    "global_accuracy": r.global_accuracy,
                    "global_accuracy_worst10": r.global_accuracy_worst10,
                    "personalized_accuracy": r.personalized_accuracy,
                    "personalized_accuracy_worst10": r.personalized_accuracy_worst10,
                    "global_perplexity": r.global_perplexity,
                    "personalized_perplexity": r.personalized_perplexity,
                    "train_loss": r.train_loss,
                    "bytes_up": r.bytes_up,
                    "bytes_down": r.bytes_down,
                    "clients_trained": r.clients_trained,
                    "clients_failed": r.clients_failed,
                    "clients_rejected": r.clients_rejected,
                    "epsilon_max": r.epsilon_max,
                    "client_dp_epsilon": r.client_dp_epsilon,
                    "wall_s": r.wall_s,
                }
                for r in rounds
            ],
            "final": final,
            "per_client": {
                "final_round": last.per_client,
                "local_only_accuracy": self.local_only,
                "local_only_loss": self.local_only_loss,
            },
            **extra,
        }
        tmp = self.out_dir / (SUMMARY + ".tmp")
        tmp.write_text(json.dumps(summary, indent=2, allow_nan=True))
        tmp.replace(self.out_dir / SUMMARY)
        self.event("done", summary=SUMMARY)
        return summary
