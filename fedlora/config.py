"""Run configuration: Flower's flat kebab-case run config parsed once into frozen dataclasses."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedlora.errors import ConfigError

__all__ = [
    "DataConfig",
    "FederationConfig",
    "ModelConfig",
    "PrivacyConfig",
    "RunConfig",
    "TrainConfig",
    "TASKS",
]

TASKS = ("classification", "causal-lm")
# Client-level DP: where each client's whole update is clipped before the server adds noise.
CLIENT_DP_MODES = ("off", "server-clipping", "client-clipping")
Scalar = bool | int | float | str


def _fail(key: str, accepted: str, value: object) -> ConfigError:
    return ConfigError(f"{key}: must be {accepted}, got {value!r}")


def _require_module(module: str, key: str, install: str) -> None:
    """Fail before any training when ``key`` needs a package that is not installed."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"{key}: needs the package {install}; {module!r} is not installed")


@dataclass(frozen=True)
class ModelConfig:
    """Base model and LoRA adapter shape.

    ``model`` is a bundled name (``minilm``, ``tiny-bert``, ``tiny-llama``), a local folder
    or a Hugging Face hub id. An empty ``lora_target_modules`` picks the architecture's
    default (attention query/value projections).
    """

    model: str = "minilm"
    task: str = "classification"
    max_length: int = 32
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: tuple[str, ...] = ()
    client_ranks: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.model.strip():
            raise _fail("model", "a bundled model name, a local folder or a hub id", self.model)
        if self.task not in TASKS:
            raise _fail("task", f"one of {', '.join(TASKS)}", self.task)
        if self.max_length < 4:
            raise _fail("max-length", "an integer >= 4", self.max_length)
        if self.lora_rank <= 0:
            raise _fail("lora-rank", "a positive integer", self.lora_rank)
        if self.lora_alpha <= 0:
            raise _fail("lora-alpha", "a positive integer", self.lora_alpha)
        if not 0.0 <= self.lora_dropout < 1.0:
            raise _fail("lora-dropout", "a number in [0, 1)", self.lora_dropout)
        if not all(r.isdigit() and int(r) > 0 for r in self.client_ranks):
            raise _fail("client-ranks", "comma-separated positive integers", ",".join(self.client_ranks))

    def ranks(self) -> list[int]:
        """Every LoRA rank in use: ``client-ranks`` if given, else ``lora-rank``."""
        return [int(r) for r in self.client_ranks] or [self.lora_rank]

    def rank_for(self, partition_id: int) -> int:
        """Client ``partition_id``'s rank: ``client-ranks`` taken in turn, else ``lora-rank``."""
        ranks = self.ranks()
        return ranks[partition_id % len(ranks)]


@dataclass(frozen=True)
class DataConfig:
    """Where client data comes from and how it is split across clients.

    ``data_dir`` (one subfolder per client with ``train.jsonl`` and ``test.jsonl``) takes
    precedence over the bundled ``dataset``; the partitioner only applies to the latter.
    """

    dataset: str = "bbc-news"
    data_dir: str = ""
    partitioner: str = "dirichlet"
    dirichlet_alpha: float = 0.3
    test_fraction: float = 0.5
    labels: tuple[str, ...] = ()
    min_lines: int = 40

    def __post_init__(self) -> None:
        from fedlora.data.partition import PARTITIONERS
        from fedlora.data.sources import DATASETS

        if not self.data_dir and self.dataset not in DATASETS:
            raise _fail("dataset", f"one of {', '.join(sorted(DATASETS))}", self.dataset)
        if self.partitioner not in PARTITIONERS:
            raise _fail("partitioner", f"one of {', '.join(sorted(PARTITIONERS))}", self.partitioner)
        if self.dirichlet_alpha <= 0:
            raise _fail("dirichlet-alpha", "a positive number", self.dirichlet_alpha)
        if not 0.0 < self.test_fraction < 1.0:
            raise _fail("test-fraction", "a number in (0, 1)", self.test_fraction)
        if self.min_lines < 2:
            raise _fail("min-lines", "an integer >= 2 (a train and a test line)", self.min_lines)
        if len(set(self.labels)) != len(self.labels):
            raise _fail("labels", "a comma-separated list without repeats", ",".join(self.labels))


@dataclass(frozen=True)
class TrainConfig:
    """Local training on a client: what one round of local work is."""

    batch_size: int = 16
    learning_rate: float = 5e-3
    local_steps: int = 3
    personal_steps: int = 3
    ditto_lambda: float = 0.1
    num_threads: int = 1

    def __post_init__(self) -> None:
        if self.batch_size <= 0:
            raise _fail("batch-size", "a positive integer", self.batch_size)
        if not 0 < self.learning_rate < 1:
            raise _fail("learning-rate", "a number in (0, 1)", self.learning_rate)
        if self.local_steps <= 0:
            raise _fail("local-steps", "a positive integer", self.local_steps)
        if self.personal_steps < 0:
            raise _fail("personal-steps", "an integer >= 0", self.personal_steps)
        if self.ditto_lambda < 0:
            raise _fail("ditto-lambda", "a number >= 0", self.ditto_lambda)
        if self.num_threads < 0:
            raise _fail("num-threads", "an integer >= 0 (0 keeps torch's default)", self.num_threads)


@dataclass(frozen=True)
class FederationConfig:
    """Server-side choices: rounds, sampling, baselines and where results go."""

    num_server_rounds: int = 5
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_clients: int = 2
    strategy: str = "fedavg"
    personalization: str = "auto"
    proximal_mu: float = 0.01
    server_learning_rate: float = 0.0
    server_momentum: float = 0.9
    trim_fraction: float = 0.2
    byzantine_clients: int = 0
    max_update_norm: float = math.inf
    local_only_baseline: bool = True
    seed: int = 0
    out_dir: str = ""
    round_timeout: float = 3600.0
    min_reply_fraction: float = 0.5
    resume: bool = False
    client_state_dir: str = ""

    def __post_init__(self) -> None:
        if self.num_server_rounds <= 0:
            raise _fail("num-server-rounds", "a positive integer", self.num_server_rounds)
        if not 0.0 < self.fraction_train <= 1.0:
            raise _fail("fraction-train", "a number in (0, 1]", self.fraction_train)
        if not 0.0 < self.fraction_evaluate <= 1.0:
            raise _fail("fraction-evaluate", "a number in (0, 1]", self.fraction_evaluate)
        if self.min_clients <= 0:
            raise _fail("min-clients", "a positive integer", self.min_clients)
        if self.proximal_mu < 0:
            raise _fail("proximal-mu", "a number >= 0", self.proximal_mu)
        if self.server_learning_rate < 0:
            raise _fail(
                "server-learning-rate", "a number >= 0 (0: the strategy's default)", self.server_learning_rate
            )
        if not 0.0 <= self.server_momentum < 1.0:
            raise _fail("server-momentum", "a number in [0, 1)", self.server_momentum)
        if not 0.0 <= self.trim_fraction < 0.5:
            raise _fail("trim-fraction", "a number in [0, 0.5)", self.trim_fraction)
        if self.byzantine_clients < 0:
            raise _fail("byzantine-clients", "an integer >= 0", self.byzantine_clients)
        if not self.max_update_norm > 0:
            raise _fail("max-update-norm", "a positive number (inf: no bound)", self.max_update_norm)
        if not self.round_timeout > 0:
            raise _fail("round-timeout", "a positive number of seconds", self.round_timeout)
        if not 0.0 <= self.min_reply_fraction <= 1.0:
            raise _fail("min-reply-fraction", "a number in [0, 1]", self.min_reply_fraction)
        from fedlora.personalization import PERSONALIZATIONS
        from fedlora.strategies import STRATEGIES

        if self.strategy not in STRATEGIES:
            raise _fail("strategy", f"one of {', '.join(sorted(STRATEGIES))}", self.strategy)
        if self.personalization != "auto" and self.personalization not in PERSONALIZATIONS:
            raise _fail(
                "personalization",
                f"auto or one of {', '.join(sorted(PERSONALIZATIONS))}",
                self.personalization,
            )
        own = "fedsa-lora"  # both a strategy and a personalization: one needs the other
        if (self.strategy == own) != (self.resolved_personalization() == own):
            raise ConfigError(
                f"personalization: {self.personalization!r} does not fit strategy {self.strategy!r}; "
                f"{own} as either needs {own} (or auto) as the other"
            )

    def resolved_personalization(self) -> str:
        """The personalization in use: ``auto`` is ``fedsa-lora`` under that strategy, else ``dual``."""
        if self.personalization != "auto":
            return self.personalization
        return "fedsa-lora" if self.strategy == "fedsa-lora" else "dual"


@dataclass(frozen=True)
class PrivacyConfig:
    """Sample-level DP-SGD on every client (off while both noise and target epsilon are 0).

    ``dp-target-epsilon`` > 0 picks each client's noise multiplier so that its whole run
    (rounds x (local + personal steps), at its own sample rate) spends that epsilon;
    otherwise ``dp-noise-multiplier`` is used as given. A client whose next round would
    take it past ``dp-epsilon-budget`` declines to train.
    """

    dp_noise_multiplier: float = 0.0
    dp_target_epsilon: float = 0.0
    dp_max_grad_norm: float = 1.0
    dp_delta: float = 1e-5
    dp_accountant: str = "rdp"
    dp_epsilon_budget: float = math.inf
    dp_secure_mode: bool = False
    dp_personal: bool = True
    client_dp: str = "off"
    client_dp_noise_multiplier: float = 1.0
    client_dp_clipping_norm: float = 1.0
    client_dp_epsilon_budget: float = math.inf
    secure_aggregation: bool = False
    secagg_clipping_range: float = 8.0
    secagg_max_weight: float = 1000.0
    canary_repeats: int = 0
    canary_client: int = 0
    audit_wire_log: str = ""

    def __post_init__(self) -> None:
        from fedlora.privacy.ledger import ACCOUNTANTS

        if self.dp_noise_multiplier < 0:
            raise _fail(
                "dp-noise-multiplier",
                "a number >= 0 (0: DP off unless dp-target-epsilon)",
                self.dp_noise_multiplier,
            )
        if self.dp_target_epsilon < 0:
            raise _fail(
                "dp-target-epsilon", "a number >= 0 (0: use dp-noise-multiplier)", self.dp_target_epsilon
            )
        if self.dp_max_grad_norm <= 0:
            raise _fail("dp-max-grad-norm", "a positive number", self.dp_max_grad_norm)
        if not 0.0 < self.dp_delta < 1.0:
            raise _fail("dp-delta", "a number in (0, 1)", self.dp_delta)
        if self.dp_accountant not in ACCOUNTANTS:
            raise _fail("dp-accountant", f"one of {', '.join(ACCOUNTANTS)}", self.dp_accountant)
        if not self.dp_epsilon_budget > 0:
            raise _fail("dp-epsilon-budget", "a positive number (inf: no budget)", self.dp_epsilon_budget)
        if self.dp_secure_mode and self.enabled:
            _require_module(
                "torchcsprng",
                "dp-secure-mode",
                "torchcsprng, Opacus' cryptographically secure noise source (not on PyPI: build it "
                "from github.com/pytorch/csprng), or set dp-secure-mode=false",
            )
        if self.client_dp not in CLIENT_DP_MODES:
            raise _fail("client-dp", f"one of {', '.join(CLIENT_DP_MODES)}", self.client_dp)
        if not self.client_dp_noise_multiplier > 0:
            raise _fail("client-dp-noise-multiplier", "a positive number", self.client_dp_noise_multiplier)
        if not self.client_dp_clipping_norm > 0:
            raise _fail("client-dp-clipping-norm", "a positive number", self.client_dp_clipping_norm)
        if not self.client_dp_epsilon_budget > 0:
            raise _fail(
                "client-dp-epsilon-budget",
                "a positive number (inf: no budget)",
                self.client_dp_epsilon_budget,
            )
        if self.client_dp != "off":
            _require_module("dp_accounting", "client-dp", 'flwr[dp] (pip install "flwr[dp]")')
        if not self.secagg_clipping_range > 0:
            raise _fail("secagg-clipping-range", "a positive number", self.secagg_clipping_range)
        if self.canary_repeats < 0:
            raise _fail("canary-repeats", "an integer >= 0 (0: no canary)", self.canary_repeats)
        if self.canary_client < 0:
            raise _fail("canary-client", "a partition id >= 0", self.canary_client)
        if not self.secagg_max_weight > 0:
            raise _fail("secagg-max-weight", "a positive number", self.secagg_max_weight)

    @property
    def client_level(self) -> bool:
        """Whether the server clips whole client updates and adds noise to their mean."""
        return self.client_dp != "off"

    @property
    def enabled(self) -> bool:
        """Whether clients train with DP-SGD."""
        return self.dp_noise_multiplier > 0 or self.dp_target_epsilon > 0

    def noise_for(self, sample_rate: float, total_steps: int) -> float:
        """The noise multiplier of a client with this sample rate and number of steps in the run."""
        if self.dp_target_epsilon <= 0:
            return self.dp_noise_multiplier
        from opacus.accountants.utils import get_noise_multiplier

        return float(
            get_noise_multiplier(
                target_epsilon=self.dp_target_epsilon,
                target_delta=self.dp_delta,
                sample_rate=sample_rate,
                steps=total_steps,
                accountant=self.dp_accountant,
            )
        )


_SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "federation": FederationConfig,
    "privacy": PrivacyConfig,
}


def _strategies() -> dict[str, Any]:
    from fedlora.strategies import STRATEGIES

    return STRATEGIES


def _key(field_name: str) -> str:
    return field_name.replace("_", "-")


def _coerce(key: str, raw: Any, default: Any) -> Any:
    """Convert a run-config value to the type of the field's default, or fail naming the key."""
    if isinstance(default, bool):
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("true", "false", "1", "0"):
            return raw.lower() in ("true", "1")
        if isinstance(raw, int) and raw in (0, 1):
            return bool(raw)
        raise _fail(key, "true or false", raw)
    if isinstance(default, int):
        if isinstance(raw, bool) or isinstance(raw, float) and not raw.is_integer():
            raise _fail(key, "an integer", raw)
        try:
            return int(raw)
        except (TypeError, ValueError):
            raise _fail(key, "an integer", raw) from None
    if isinstance(default, float):
        if isinstance(raw, bool):
            raise _fail(key, "a number", raw)
        try:
            return float(raw)
        except (TypeError, ValueError):
            raise _fail(key, "a number", raw) from None
    if isinstance(default, tuple):
        items = raw.split(",") if isinstance(raw, str) else list(raw)
        return tuple(str(item).strip() for item in items if str(item).strip())
    if not isinstance(raw, str):
        raise _fail(key, "a string", raw)
    return raw


@dataclass(frozen=True)
class RunConfig:
    """The whole run configuration, one frozen section per concern."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)

    def __post_init__(self) -> None:
        from fedlora.strategies import strategy_info

        info = strategy_info(self.federation.strategy)
        if self.model.client_ranks and not info.protocol.heterogeneous_ranks:
            heterogeneous = sorted(n for n, i in _strategies().items() if i.protocol.heterogeneous_ranks)
            raise ConfigError(
                f"client-ranks: per-client ranks need strategy {' or '.join(heterogeneous)} "
                f"(one rank for all: lora-rank), got {self.federation.strategy!r}"
            )
        privacy, strategy = self.privacy, self.federation.strategy
        if privacy.canary_repeats and self.model.task != "causal-lm":
            raise ConfigError(
                f"canary-repeats: the canary exposure audit needs task causal-lm, got {self.model.task!r}"
            )
        if privacy.client_level and not info.plain_mean:
            usable = sorted(n for n, i in _strategies().items() if i.plain_mean)
            raise ConfigError(
                f"client-dp: client-level DP needs a strategy whose server takes the plain mean of "
                f"the uploads ({', '.join(usable)}), got {strategy!r}"
            )
        if privacy.secure_aggregation and not info.sum_only:
            usable = sorted(n for n, i in _strategies().items() if i.sum_only)
            raise ConfigError(
                f"secure-aggregation: the server sees only the sum of the uploads, which strategy "
                f"{strategy!r} cannot work from; use one of {', '.join(usable)}"
            )
        if privacy.secure_aggregation and self.federation.resume:
            raise ConfigError(
                "resume: resuming from a checkpoint is not yet available with secure-aggregation"
            )
        if privacy.secure_aggregation and privacy.client_level:
            raise ConfigError(
                "client-dp: client-level DP is not yet available together with secure-aggregation; "
                "use one of them (sample-level DP-SGD, dp-noise-multiplier, works with both)"
            )
        # A regulariser's gradient bypasses DP-SGD's per-example clipping: not combined yet.
        ditto = self.federation.resolved_personalization() == "ditto"
        regularized = info.protocol.proximal or (ditto and self.privacy.dp_personal)
        if self.privacy.enabled and regularized:
            fed = self.federation
            raise ConfigError(
                f"dp-noise-multiplier: DP-SGD is not yet available with strategy {fed.strategy!r} and "
                f"personalization {fed.resolved_personalization()!r} (fedprox and ditto add a regulariser); "
                "use another strategy or personalization, dp-personal=false with ditto, or turn DP off"
            )

    @classmethod
    def accepted_keys(cls) -> list[str]:
        """Every kebab-case key a run config may contain."""
        return sorted(_key(f.name) for section in _SECTIONS.values() for f in dataclasses.fields(section))

    @classmethod
    def from_flat(cls, flat: Mapping[str, Scalar]) -> RunConfig:
        """Build from Flower's flat kebab-case run config, rejecting unknown keys.

        Parameters
        ----------
        flat : Mapping[str, Scalar]
            Keys as in ``[tool.flwr.app.config]`` or ``--run-config``; missing keys
            take the defaults.

        Raises
        ------
        ConfigError
            One line naming the offending key and what it accepts.

        """
        accepted = set(cls.accepted_keys())
        unknown = sorted(set(flat) - accepted)
        if unknown:
            raise ConfigError(
                f"{unknown[0]}: unknown run-config key; accepted keys: {', '.join(sorted(accepted))}"
            )
        sections: dict[str, Any] = {}
        for name, section in _SECTIONS.items():
            kwargs = {}
            defaults = section()
            for f in dataclasses.fields(section):
                key = _key(f.name)
                if key in flat:
                    kwargs[f.name] = _coerce(key, flat[key], getattr(defaults, f.name))
            sections[name] = section(**kwargs)
        return cls(**sections)

    def to_flat(self) -> dict[str, Scalar]:
        """Inverse of `from_flat`: a flat kebab-case dict (tuples joined by commas)."""
        flat: dict[str, Scalar] = {}
        for name in _SECTIONS:
            section = getattr(self, name)
            for f in dataclasses.fields(section):
                value = getattr(section, f.name)
                flat[_key(f.name)] = ",".join(value) if isinstance(value, tuple) else value
        return flat

    def replace(self, **flat: Scalar) -> RunConfig:
        """Return a copy with some kebab-case keys (given with underscores) overridden."""
        merged = self.to_flat()
        merged.update({_key(k): v for k, v in flat.items()})
        return RunConfig.from_flat(merged)
