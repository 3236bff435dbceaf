"""Run configuration: Flower's flat kebab-case run config parsed once into frozen sections.

The config layer knows every key, its type, its bounds and its metadata (`FieldInfo`),
but no method registry: which strategy or personalization a name means, and which of
them combine, is decided by `fedlora.plan`.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedlora.config.fields import FieldInfo, Scalar, coerce, key
from fedlora.config.sections import (
    CAUSAL_TASKS,
    CLIENT_DP_MODES,
    DP_ACCOUNTANTS,
    HF_PREFIX,
    TASKS,
    DataConfig,
    FederationConfig,
    ModelConfig,
    PrivacyConfig,
    TrainConfig,
)
from fedlora.core.errors import ConfigError

__all__ = [
    "CAUSAL_TASKS",
    "CLIENT_DP_MODES",
    "DP_ACCOUNTANTS",
    "HF_PREFIX",
    "TASKS",
    "DataConfig",
    "FederationConfig",
    "FieldInfo",
    "ModelConfig",
    "PrivacyConfig",
    "RunConfig",
    "Scalar",
    "TrainConfig",
    "field_info",
    "keys_where",
    "reference_table",
]

_SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "federation": FederationConfig,
    "privacy": PrivacyConfig,
}


def _fields() -> list[tuple[str, dataclasses.Field[Any]]]:
    # (section name, field) for every key, in section order.
    return [(name, f) for name, section in _SECTIONS.items() for f in dataclasses.fields(section)]


def field_info(run_key: str) -> FieldInfo:
    """The metadata of one run-config key.

    Raises
    ------
    ConfigError
        If no key has that name.

    """
    for _, f in _fields():
        if key(f.name) == run_key:
            info: FieldInfo = f.metadata["fedlora"]
            return info
    raise ConfigError(unknown_key(run_key, RunConfig.accepted_keys()))


def unknown_key(name: str, accepted: list[str]) -> str:
    """The one-line error for an unknown key: the closest accepted key if one is near, else all of them.

    Underscores count as dashes (the Python API takes ``lora_rank``, the run config ``lora-rank``).
    """
    close = difflib.get_close_matches(name.replace("_", "-"), accepted, n=1, cutoff=0.75)
    if close:
        return f"{name}: unknown run-config key; did you mean {close[0]}?"
    return f"{name}: unknown run-config key; accepted keys: {', '.join(accepted)}"


def keys_where(flag: str) -> frozenset[str]:
    """Every run-config key whose `FieldInfo` has ``flag`` set (``identity``, ``resumable``, ...)."""
    return frozenset(key(f.name) for _, f in _fields() if getattr(f.metadata["fedlora"], flag))


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return '""'
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


def reference_table() -> str:
    """The configuration reference as a Markdown table: key, default, meaning."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for _, f in _fields():
        rows.append(f"| `{key(f.name)}` | `{_shown(f.default)}` | {f.metadata['fedlora'].help} |")
    return "\n".join(rows)


@dataclass(frozen=True)
class RunConfig:
    """The whole run configuration, one frozen section per concern.

    Only rules between keys are checked here; rules between methods are `fedlora.plan`'s.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)

    def __post_init__(self) -> None:
        privacy = self.privacy
        if privacy.canary_repeats and self.model.task != "causal-lm":
            raise ConfigError(
                f"canary-repeats: the canary exposure audit needs task causal-lm, got {self.model.task!r}"
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

    @classmethod
    def accepted_keys(cls) -> list[str]:
        """Every kebab-case key a run config may contain."""
        return sorted(key(f.name) for _, f in _fields())

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
            raise ConfigError(unknown_key(unknown[0], sorted(accepted)))
        sections: dict[str, Any] = {}
        for name, section in _SECTIONS.items():
            kwargs = {}
            for f in dataclasses.fields(section):
                run_key = key(f.name)
                if run_key in flat:
                    unbounded = f.metadata["fedlora"].unbounded
                    kwargs[f.name] = coerce(run_key, flat[run_key], f.default, unbounded=unbounded)
            sections[name] = section(**kwargs)
        return cls(**sections)

    def to_flat(self) -> dict[str, Scalar]:
        """Inverse of `from_flat`: a flat kebab-case dict (tuples joined by commas)."""
        flat: dict[str, Scalar] = {}
        for name, f in _fields():
            value = getattr(getattr(self, name), f.name)
            flat[key(f.name)] = ",".join(value) if isinstance(value, tuple) else value
        return flat

    def replace(self, **flat: Scalar) -> RunConfig:
        """Return a copy with some kebab-case keys (given with underscores) overridden."""
        merged = self.to_flat()
        merged.update({key(k): v for k, v in flat.items()})
        return RunConfig.from_flat(merged)
