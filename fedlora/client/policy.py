"""A device's own policy: what a run config may make it load, its privacy floor, its work caps.

Whoever submits a run writes its run config; on a device (a node with its own ``data-dir``)
the owner's node config, set by ``fedlora client`` flags, has the last word:

- ``model`` resolves only to a bundled model or to one the owner allowed (``--allow-model``);
- DP-SGD may be required, with a floor on the noise multiplier the run would use (its
  ``dp-noise-multiplier``, or the one calibrated from ``dp-target-epsilon``), a cap on the
  run's epsilon (its ``dp-epsilon-budget`` and ``dp-target-epsilon``) and one on the
  device's lifetime epsilon, both read at a ``dp-delta`` of at most ``--max-delta``;
- local and personal steps per round, torch threads, tokens per example and the examples
  evaluated per round are capped.

A run that asks for less privacy or more work is refused whole, not clamped: the client
raises `PolicyRefused` (an error reply naming each field, the device's limit and what the
run asked) before any model is loaded, so nothing of the run trains, spends epsilon or is
stored. A device profile (`fedlora.client.profiles`) clamps the run's settings first; the
policy judges what would then run.

The lifetime cap is sequential composition read conservatively: the epsilon of every
other run in the device's state folder, each at this run's delta, summed, plus this run's
budget (``dp-epsilon-budget``, which the client already never exceeds). k runs that are
each (epsilon_i, delta)-DP are (sum epsilon_i, k delta)-DP together (basic composition,
Dwork and Roth 2014, Theorem 3.16); one accountant composing every run's steps would
report a smaller epsilon, since it pays the conversion to (epsilon, delta) once.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from fedlora.config import RunConfig
from fedlora.core import keys
from fedlora.core.errors import ConfigError, FedloraError

__all__ = ["DevicePolicy", "PolicyRefused", "RunRequest", "allowed_model_entry"]

# Node config values are scalars: the allowed models travel as one string, one per line.
MODEL_SEPARATOR = "\n"
# A Hugging Face hub id: ``name`` or ``org/name``.
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9_.-]+)?")
# The longest run-config model name a refusal repeats (the rest is cut).
_SHOWN = 80


class PolicyRefused(FedloraError):
    """A run asks for less privacy or more work than the device's own policy allows."""

    def public(self) -> str:
        """The whole message: the run's values and the device's limits, never a path of the device."""
        return f"{type(self).__name__}: {self}"


@dataclass(frozen=True)
class RunRequest:
    """What a run asks of this device, as it would run here (after the device profile's caps).

    Attributes
    ----------
    model : str
        The run config's ``model``, as written there.
    dp : bool
        Whether the run trains with DP-SGD.
    noise_multiplier : float
        The DP-SGD noise multiplier the run would use (0 with DP off).
    calibrated : bool
        Whether that noise multiplier was calibrated from ``dp-target-epsilon``.
    target_epsilon, epsilon_budget, delta : float
        The run's ``dp-target-epsilon``, ``dp-epsilon-budget`` and ``dp-delta``.
    local_steps, personal_steps, num_threads, max_length, eval_examples, audit_examples : int
        The run's work per round (``num-threads`` 0: torch's default, every core;
        ``eval-examples`` 0: every held-out example).
    spent_here : float
        Epsilon already in this federation's ledger on the device, at ``delta``.
    spent_elsewhere : float
        The epsilons of the device's other runs, each at ``delta``, summed.

    """

    model: str
    dp: bool = False
    noise_multiplier: float = 0.0
    calibrated: bool = False
    target_epsilon: float = 0.0
    epsilon_budget: float = math.inf
    delta: float = 1e-5
    local_steps: int = 1
    personal_steps: int = 0
    num_threads: int = 1
    max_length: int = 32
    eval_examples: int = 32
    audit_examples: int = 0
    spent_here: float = 0.0
    spent_elsewhere: float = 0.0

    @classmethod
    def of(
        cls, cfg: RunConfig, *, noise_multiplier: float, spent_here: float = 0.0, spent_elsewhere: float = 0.0
    ) -> RunRequest:
        """The request of run config ``cfg``, whose DP-SGD would use ``noise_multiplier``."""
        privacy, train = cfg.privacy, cfg.train
        return cls(
            model=cfg.model.model,
            dp=privacy.enabled,
            noise_multiplier=noise_multiplier if privacy.enabled else 0.0,
            calibrated=privacy.dp_target_epsilon > 0,
            target_epsilon=privacy.dp_target_epsilon,
            epsilon_budget=privacy.dp_epsilon_budget,
            delta=privacy.dp_delta,
            local_steps=train.local_steps,
            personal_steps=train.personal_steps,
            num_threads=train.num_threads,
            max_length=cfg.model.max_length,
            eval_examples=cfg.federation.eval_examples,
            audit_examples=privacy.audit_examples,
            spent_here=spent_here,
            spent_elsewhere=spent_elsewhere,
        )


def allowed_model_entry(value: str) -> str:
    """A ``--allow-model`` value as the node config keeps it: a folder made absolute, or a hub id.

    Raises
    ------
    ConfigError
        If ``value`` names a path that is not a folder, or is neither a folder nor a hub id.

    """
    local = Path(value).expanduser()
    if local.is_dir():
        return str(local.resolve())
    if value.startswith(("/", "~", ".")) or local.exists():
        raise ConfigError(f"allow-model: {value} is not a folder")
    if not _HUB_ID.fullmatch(value):
        raise ConfigError(f"allow-model: a model folder or a hub id (name or org/name), got {value!r}")
    return value


def _bundled() -> frozenset[str]:
    from fedlora.models import BUNDLED_MODELS  # noqa: PLC0415 - heavy: torch (the CLI reads policies without it)

    return frozenset(BUNDLED_MODELS)


def _resolved(name: str) -> Path | None:
    try:
        return Path(name).expanduser().resolve()
    except (OSError, RuntimeError, ValueError):  # a NUL byte, a symlink loop
        return None


@dataclass(frozen=True)
class DevicePolicy:
    """A device owner's limits on what any run may do on the device (node config, read once).

    The defaults limit nothing: a node without policy keys runs what the run config says.

    Attributes
    ----------
    allowed_models : tuple of str
        Model folders (absolute) and hub ids a run may name beside the bundled models.
    min_noise_multiplier : float
        The lowest DP-SGD noise multiplier a run may use (> 0: DP-SGD required).
    max_epsilon : float
        The largest ``dp-epsilon-budget`` and ``dp-target-epsilon`` of a run (finite: DP-SGD
        required, and a run must set a budget).
    max_lifetime_epsilon : float
        The largest sum of the epsilons of every run in the device's state folder, this run's
        budget included (finite: DP-SGD and a budget required).
    max_delta : float
        The largest ``dp-delta`` of a run while an epsilon cap is set.
    require_dp : bool
        Refuse runs without DP-SGD.
    max_steps, max_threads, max_length, max_eval_examples : int
        Caps on ``local-steps`` and ``personal-steps``, ``num-threads``, ``max-length``, and
        ``eval-examples`` and ``audit-examples``; 0: no cap.

    """

    allowed_models: tuple[str, ...] = ()
    min_noise_multiplier: float = 0.0
    max_epsilon: float = math.inf
    max_lifetime_epsilon: float = math.inf
    max_delta: float = 1e-5
    require_dp: bool = False
    max_steps: int = 0
    max_threads: int = 0
    max_length: int = 0
    max_eval_examples: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.min_noise_multiplier) and self.min_noise_multiplier >= 0):
            raise ConfigError(f"min-noise-multiplier: must be a number >= 0, got {self.min_noise_multiplier}")
        for name, value in (
            (keys.NODE_MAX_EPSILON, self.max_epsilon),
            (keys.NODE_MAX_LIFETIME_EPSILON, self.max_lifetime_epsilon),
        ):
            if math.isnan(value) or value <= 0:
                raise ConfigError(f"{name}: must be a number > 0, got {value}")
        if not 0 < self.max_delta < 1:
            raise ConfigError(f"max-delta: must be a number in (0, 1), got {self.max_delta}")
        for name, cap in (
            (keys.NODE_MAX_STEPS, self.max_steps),
            (keys.NODE_MAX_THREADS, self.max_threads),
            (keys.NODE_MAX_LENGTH, self.max_length),
            (keys.NODE_MAX_EVAL_EXAMPLES, self.max_eval_examples),
        ):
            if isinstance(cap, bool) or not isinstance(cap, int) or cap < 0:
                raise ConfigError(f"{name}: must be an integer >= 0 (0: no cap), got {cap!r}")
        for model in self.allowed_models:
            if not model.strip() or MODEL_SEPARATOR in model:
                raise ConfigError(f"allowed-models: one folder or hub id per entry, got {model!r}")

    @property
    def epsilon_capped(self) -> bool:
        """Whether a run's epsilon is capped, per run or over the device's lifetime."""
        return math.isfinite(self.max_epsilon) or math.isfinite(self.max_lifetime_epsilon)

    def _requires_dp(self) -> list[str]:
        """The settings that make DP-SGD required."""
        return [
            flag
            for flag, on in (
                ("--require-dp", self.require_dp),
                (f"--min-noise-multiplier {self.min_noise_multiplier:g}", self.min_noise_multiplier > 0),
                (f"--max-epsilon {self.max_epsilon:g}", math.isfinite(self.max_epsilon)),
                (
                    f"--max-lifetime-epsilon {self.max_lifetime_epsilon:g}",
                    math.isfinite(self.max_lifetime_epsilon),
                ),
            )
            if on
        ]

    @classmethod
    def from_node_config(cls, node: Mapping[str, object]) -> DevicePolicy:
        """The policy in a node config (`to_node_config`'s keys; missing ones limit nothing).

        Raises
        ------
        ConfigError
            On a value of the wrong type or out of range, naming its key.

        """
        values: dict[str, object] = {}
        for field in fields(cls):
            key = field.name.replace("_", "-")  # keys.NODE_POLICY
            if key not in node:
                continue
            value = node[key]
            if field.name == "allowed_models":
                if not isinstance(value, str):
                    raise ConfigError(f"{key}: must be a string of lines, got {value!r}")
                values[field.name] = tuple(m for m in value.split(MODEL_SEPARATOR) if m)
            elif field.name == "require_dp":
                if not isinstance(value, bool):
                    raise ConfigError(f"{key}: must be true or false, got {value!r}")
                values[field.name] = value
            elif field.type == "float":
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ConfigError(f"{key}: must be a number, got {value!r}")
                values[field.name] = float(value)
            else:
                values[field.name] = value
        return cls(**values)  # type: ignore[arg-type]

    def to_node_config(self) -> dict[str, str | int | float | bool]:
        """The node-config entries of this policy: only those that limit something."""
        default = DevicePolicy()
        pairs: dict[str, str | int | float | bool] = {}
        for field in fields(self):
            value = getattr(self, field.name)
            if value == getattr(default, field.name):
                continue
            key = field.name.replace("_", "-")  # keys.NODE_POLICY
            pairs[key] = MODEL_SEPARATOR.join(value) if field.name == "allowed_models" else value
        return pairs

    def allows_model(self, name: str) -> bool:
        """Whether a run config's ``model`` may be loaded here: bundled, or allowed by the owner.

        A hub id must be allowed as written; a path (``~`` expanded, relative to the working
        folder, as the model loader reads it) must resolve to an allowed folder.
        """
        if name in _bundled() or name in self.allowed_models:
            return True
        resolved = _resolved(name)
        allowed = {_resolved(m) for m in self.allowed_models if Path(m).is_absolute()}
        return resolved is not None and resolved in allowed

    def violations(self, request: RunRequest) -> list[str]:
        """Each way ``request`` asks for less privacy or more work than this policy allows."""
        found = []
        if not self.allows_model(request.model):
            shown = request.model if len(request.model) <= _SHOWN else request.model[:_SHOWN] + "..."
            found.append(f"model {shown!r} is not allowed on this device (bundled models or --allow-model)")
        found += self._privacy(request)
        for field, asked, cap, flag in (
            ("local-steps", request.local_steps, self.max_steps, "--max-steps"),
            ("personal-steps", request.personal_steps, self.max_steps, "--max-steps"),
            ("max-length", request.max_length, self.max_length, "--max-length"),
            ("audit-examples", request.audit_examples, self.max_eval_examples, "--max-eval-examples"),
        ):
            if cap and asked > cap:
                found.append(f"{field} {asked} is over this device's {cap} ({flag})")
        if self.max_threads:
            threads = request.num_threads or (os.cpu_count() or 1)
            if threads > self.max_threads:
                shown = f"0 (torch's default: {threads} cores)" if not request.num_threads else str(threads)
                found.append(f"num-threads {shown} is over this device's {self.max_threads} (--max-threads)")
        if self.max_eval_examples and not 0 < request.eval_examples <= self.max_eval_examples:
            shown = "0 (every held-out example)" if not request.eval_examples else str(request.eval_examples)
            found.append(
                f"eval-examples {shown} is over this device's {self.max_eval_examples} (--max-eval-examples)"
            )
        return found

    def _privacy(self, request: RunRequest) -> list[str]:
        required = self._requires_dp()
        if not request.dp:
            return [f"DP-SGD is off; this device requires it ({', '.join(required)})"] if required else []
        found = []
        if request.noise_multiplier < self.min_noise_multiplier:
            how = (
                f" (calibrated from dp-target-epsilon {request.target_epsilon:g})"
                if request.calibrated
                else ""
            )
            found.append(
                f"dp-noise-multiplier {request.noise_multiplier:.4g}{how} is below this device's floor "
                f"{self.min_noise_multiplier:g} (--min-noise-multiplier)"
            )
        if not self.epsilon_capped:
            return found
        if request.delta > self.max_delta:
            found.append(f"dp-delta {request.delta:g} is over this device's {self.max_delta:g} (--max-delta)")
        if request.epsilon_budget > self.max_epsilon:
            found.append(
                f"dp-epsilon-budget {request.epsilon_budget:g} is over this device's {self.max_epsilon:g} "
                "(--max-epsilon)"
            )
        if request.target_epsilon > self.max_epsilon:
            found.append(
                f"dp-target-epsilon {request.target_epsilon:g} is over this device's {self.max_epsilon:g} "
                "(--max-epsilon)"
            )
        # This federation's ledger never passes the budget; one already past it trains no more.
        this_run = max(request.spent_here, request.epsilon_budget)
        lifetime = request.spent_elsewhere + this_run
        if lifetime > self.max_lifetime_epsilon:
            found.append(
                f"dp-epsilon-budget {request.epsilon_budget:g} would bring this device's lifetime epsilon to "
                f"{lifetime:.4g} (its other runs {request.spent_elsewhere:.4g} + this run {this_run:.4g}), "
                f"over its {self.max_lifetime_epsilon:g} (--max-lifetime-epsilon)"
            )
        return found

    def check(self, request: RunRequest) -> None:
        """Refuse ``request`` if it asks for less privacy or more work than this policy allows.

        Raises
        ------
        PolicyRefused
            Naming each field at fault, the device's limit and what the run asked.

        """
        found = self.violations(request)
        if found:
            raise PolicyRefused("policy: " + "; ".join(found))
