"""The run directory: its file names, and the records it holds as dataclasses.

``summary.json`` is `RunSummary.to_dict`; ``metrics.jsonl`` holds one event per line
(``round`` events carry a `RoundRecord` without its per-client part); ``config.json`` is
the flat run config with the resolved label set. Readers (`fedlora.api`, the CLI) use
`RunSummary.read` rather than string keys.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlora.core.errors import ConfigError

__all__ = [
    "CHECKPOINT",
    "ERROR_LINE",
    "RESPONSES",
    "RESPONSE_CLIENTS",
    "RESULTS_LINE",
    "CLIENTS",
    "CONFIG",
    "GLOBAL_ADAPTER",
    "METRICS",
    "ROUNDS",
    "SUMMARY",
    "ClientRecord",
    "ClientsSummary",
    "FinalSummary",
    "RoundRecord",
    "RoundSummary",
    "RunSummary",
    "read_config",
    "read_summary",
    "summary_text",
]

SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
CONFIG = "config.json"
GLOBAL_ADAPTER = "global_adapter"
CHECKPOINT = "checkpoint"
ROUNDS = "rounds"  # rounds/round-NNN: each round's global adapter
CLIENTS = "clients"  # where `fedlora simulate` keeps the clients' state
# Chat runs' side-by-side replies (`fedlora.export.write_responses`), and the clients they cover at most.
RESPONSES = "responses.jsonl"
RESPONSE_CLIENTS = 16
RESULTS_LINE = "fedlora: writing results to"  # the ServerApp's line naming its run directory
ERROR_LINE = (
    "fedlora: error:"  # how a failed ServerApp's last log line starts: `simulate` and `submit` report it
)


def read_config(out_dir: Path) -> dict[str, Any]:
    """The flat run config a run directory was written with (``config.json``).

    Raises
    ------
    ConfigError
        If the file is missing, is not JSON, or is not a JSON object.

    """
    path = out_dir / CONFIG
    try:
        saved = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(
            f"{CONFIG}: {path} cannot be read as a run config ({type(err).__name__})", where=CONFIG
        ) from None
    if not isinstance(saved, dict):
        raise ConfigError(f"{CONFIG}: {path} holds no JSON object", where=CONFIG)
    return saved


@dataclass(frozen=True)
class ClientRecord:
    """One client's evaluation in a round, as kept in ``per_client`` of a round and the summary.

    The optional parts are present only where they apply: ``partition`` for a simulated
    client (its partition id; the record is kept under the client's name), ``epsilon`` and
    ``budget_exhausted`` under DP-SGD, the membership-inference advantages in the final
    round, the canary exposures on a run with a canary.
    """

    partition: int | None = None
    global_accuracy: float = math.nan
    personalized_accuracy: float = math.nan
    num_test_examples: float = math.nan
    personal_rounds: float = math.nan
    global_loss: float = math.nan
    personalized_loss: float = math.nan
    epsilon: float | None = None
    budget_exhausted: bool | None = None
    mia_advantage_global: float | None = None
    mia_advantage_personalized: float | None = None
    mia_advantage_chance: float | None = None
    mia_examples: float | None = None
    canary_exposure_global: float | None = None
    canary_exposure_personalized: float | None = None
    # The personalized model's mean paired gain over the global one on this client's held-out
    # examples (accuracy; causal LMs: loss) and its standard error; personal-mix: its weight.
    gain_over_global: float = math.nan
    gain_over_global_se: float = math.nan
    mix_weight: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of ``summary.json``: optional parts that do not apply are left out."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClientRecord:
        """Read one client's record; keys a newer fedlora added are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


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
    # ... and of the worst 10% of clients (the highest perplexities).
    global_perplexity_worst10: float = math.nan
    personalized_perplexity_worst10: float = math.nan
    per_client: dict[str, dict[str, Any]] = field(default_factory=dict)  # ClientRecord.to_dict()
    epsilon_max: float = math.nan
    clients_rejected: int = 0
    # The lower median of the round's valid update norms (max-update-norm-ratio's reference),
    # and the largest norm it accepted: how far from the bound honest clients stay.
    update_norm_median: float = math.nan
    update_norm_max: float = math.nan
    client_dp_epsilon: float = math.nan
    mia_advantage_global: float = math.nan
    mia_advantage_personalized: float = math.nan
    mia_advantage_chance: float = math.nan
    canary_exposure_global: float = math.nan
    canary_exposure_personalized: float = math.nan
    mia_examples: float = math.nan
    wall_s: float = 0.0
    evaluated: bool = False  # whether clients measured held-out accuracy this round (evaluate-every)
    held_out_examples: int = 0  # held-out examples measured this round, all clients (eval-examples)


@dataclass(frozen=True)
class RoundSummary:
    """One round in ``summary.json``: its accuracies, traffic and clients."""

    round: int
    global_accuracy: float = math.nan
    global_accuracy_worst10: float = math.nan
    personalized_accuracy: float = math.nan
    personalized_accuracy_worst10: float = math.nan
    global_perplexity: float = math.nan
    personalized_perplexity: float = math.nan
    global_perplexity_worst10: float = math.nan
    personalized_perplexity_worst10: float = math.nan
    train_loss: float = math.nan
    bytes_up: int = 0
    bytes_down: int = 0
    clients_trained: int = 0
    clients_failed: int = 0
    clients_rejected: int = 0
    epsilon_max: float = math.nan
    client_dp_epsilon: float = math.nan
    wall_s: float = math.nan
    evaluated: bool = False
    held_out_examples: int = 0

    @classmethod
    def of(cls, record: RoundRecord) -> RoundSummary:
        """The summary row of a round's record."""
        return cls(**{f.name: getattr(record, f.name) for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class FinalSummary:
    """The run's headline figures (``summary.json``'s ``final``; a missing figure reads as NaN).

    Accuracies and perplexities are unweighted means over the clients evaluated in the
    last round; ``*_worst10`` the mean of the worst 10% of them. Local-only figures are
    None when the baseline did not run.
    """

    global_accuracy: float = math.nan
    global_accuracy_worst10: float = math.nan
    personalized_accuracy: float = math.nan
    personalized_accuracy_worst10: float = math.nan
    local_only_accuracy: float | None = None
    local_only_accuracy_worst10: float | None = None
    global_perplexity: float = math.nan
    personalized_perplexity: float = math.nan
    local_only_perplexity: float = math.nan
    global_perplexity_worst10: float = math.nan
    personalized_perplexity_worst10: float = math.nan
    local_only_perplexity_worst10: float = math.nan
    bytes_up_per_client_round: float = math.nan
    bytes_down_per_client_round: float = math.nan
    epsilon_max: float = math.nan
    clients_out_of_budget: int = 0
    # Client-level DP: the server accountant's epsilon after the last release.
    client_dp_epsilon: float = math.nan
    # Loss-threshold membership inference on the final models (mean over clients).
    mia_advantage_global: float = math.nan
    mia_advantage_personalized: float = math.nan
    mia_advantage_chance: float = math.nan
    # Training plus held-out examples each client's audit compared (mean over clients; audit-examples).
    mia_examples: float = math.nan
    # Canary audit (causal LMs): exposure in bits of the canary client's secret.
    canary_exposure_global: float = math.nan
    canary_exposure_personalized: float = math.nan
    full_model_bytes: int = 0
    wall_s: float = math.nan
    upload_reduction: float | None = None
    # Clients on which the personalized model is better than the global (local-only) one,
    # tied with it within the client's own noise (|gain| <= 1.96 standard errors over its
    # held-out examples), or worse.
    personalized_vs_global: dict[str, int] = field(default_factory=dict)
    personalized_vs_local_only: dict[str, int] = field(default_factory=dict)
    # personal-mix: the mean over clients of the weight on the personalized model.
    mix_weight: float = math.nan


@dataclass(frozen=True)
class ClientsSummary:
    """Per-client figures: the last round's metrics by client, and the local-only baseline.

    Every client is keyed by its name (`fedlora.data.client_names`; a deployed device is
    ``node-<id>``). ``final_round`` holds `ClientRecord.to_dict` objects; `clients` reads
    them back.
    """

    final_round: dict[str, dict[str, Any]] = field(default_factory=dict)
    local_only_accuracy: dict[str, float] = field(default_factory=dict)
    local_only_loss: dict[str, float] = field(default_factory=dict)
    # The final personalized model's paired gain over the local-only one, and its standard error.
    local_only_gain: dict[str, float] = field(default_factory=dict)
    local_only_gain_se: dict[str, float] = field(default_factory=dict)

    def clients(self) -> dict[str, ClientRecord]:
        """The last round's record of every client, by name."""
        return {cid: ClientRecord.from_dict(values) for cid, values in self.final_round.items()}

    def partitions(self) -> dict[str, int]:
        """The partition id of every simulated client, by name, in partition order.

        A summary written before clients had names keys them by their partition id, which is
        read back as such; deployed devices (``node-<id>``) have none and are left out.
        """
        found: dict[str, int] = {}
        for name, values in self.final_round.items():
            pid = values.get("partition")
            if isinstance(pid, int) and not isinstance(pid, bool):
                found[name] = pid
            elif "partition" not in values and name.isascii() and name.isdigit():
                found[name] = int(name)
        return dict(sorted(found.items(), key=lambda item: item[1]))


@dataclass(frozen=True)
class RunSummary:
    """``summary.json``: the rounds, the final figures, the clients, and what was run."""

    rounds: list[RoundSummary]
    final: FinalSummary
    per_client: ClientsSummary
    labels: list[str] = field(default_factory=list)
    strategy: str = ""
    personalization: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The JSON object written to ``summary.json``."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSummary:
        """Read a ``summary.json`` object; keys a newer fedlora added are ignored."""

        def build(kind: type[Any], values: dict[str, Any]) -> Any:
            names = {f.name for f in dataclasses.fields(kind)}
            return kind(**{k: v for k, v in values.items() if k in names})

        return cls(
            rounds=[build(RoundSummary, r) for r in data.get("rounds", [])],
            final=build(FinalSummary, data.get("final", {})),
            per_client=build(ClientsSummary, data.get("per_client", {})),
            labels=list(data.get("labels", [])),
            strategy=str(data.get("strategy", "")),
            personalization=str(data.get("personalization", "")),
        )

    @classmethod
    def read(cls, out_dir: Path) -> RunSummary:
        """The summary of the run in ``out_dir``."""
        return cls.from_dict(read_summary(out_dir))


def _finite(value: Any) -> Any:
    # Strict JSON has no NaN or Infinity: a figure that was not measured is written as null.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def summary_text(summary: dict[str, Any]) -> str:
    """``summary.json``'s text: strict JSON, with null for a figure that was not measured (NaN)."""
    return json.dumps(_finite(summary), indent=2, allow_nan=False)


def _nan_where_null(values: dict[str, Any], kind: type[Any]) -> dict[str, Any]:
    # A null figure whose record defaults to NaN reads back as NaN, as it was before writing.
    nan = {f.name for f in dataclasses.fields(kind) if isinstance(f.default, float) and math.isnan(f.default)}
    return {k: math.nan if v is None and k in nan else v for k, v in values.items()}


def read_summary(out_dir: Path) -> dict[str, Any]:
    """The ``summary.json`` of the run in ``out_dir``, each unmeasured figure (null) as NaN.

    Summaries written by older fedlora, with ``NaN`` literals, read the same.
    """
    data: dict[str, Any] = json.loads((out_dir / SUMMARY).read_text())
    if isinstance(data.get("final"), dict):
        data["final"] = _nan_where_null(data["final"], FinalSummary)
    data["rounds"] = [
        _nan_where_null(r, RoundSummary) if isinstance(r, dict) else r for r in data.get("rounds", [])
    ]
    clients = data.get("per_client")
    if isinstance(clients, dict):
        for name, values in clients.items():
            if name == "final_round" and isinstance(values, dict):
                clients[name] = {
                    cid: _nan_where_null(v, ClientRecord) if isinstance(v, dict) else v
                    for cid, v in values.items()
                }
            elif isinstance(values, dict):
                clients[name] = {cid: math.nan if v is None else v for cid, v in values.items()}
    return data
