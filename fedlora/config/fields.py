"""Run-config fields: kebab-case keys, their metadata, and coercion of raw values."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from fedlora.core.errors import ConfigError

__all__ = ["FieldInfo", "Scalar", "coerce", "fail", "key", "setting"]

Scalar = bool | int | float | str


@dataclass(frozen=True)
class FieldInfo:
    """What the rest of fedlora needs to know about one run-config key.

    Attributes
    ----------
    help : str
        One line for the configuration reference (Markdown).
    identity : bool
        The key belongs to a federation's identity: a client's saved state (personal
        adapter, ledger) is kept apart for each value.
    resumable : bool
        A resumed run may change it: it says how long or how patiently the run goes on,
        not what it computes.
    placement : bool
        It says where a run keeps things, or is filled in by the launcher: two runs that
        differ only here computed the same thing.
    resolved : bool
        The saved ``config.json`` holds its resolved value (e.g. the label set found in
        the data), not what was asked.
    unbounded : bool
        ``inf`` is a meaningful value (no bound, no budget). NaN never is, and ``inf`` is
        refused for every other float key.

    """

    help: str
    identity: bool = False
    resumable: bool = False
    placement: bool = False
    resolved: bool = False
    unbounded: bool = False


def setting(
    default: Any,
    help: str,
    *,
    identity: bool = False,
    resumable: bool = False,
    placement: bool = False,
    resolved: bool = False,
    unbounded: bool = False,
) -> Any:
    """A dataclass field of a config section, carrying its `FieldInfo`."""
    info = FieldInfo(help, identity, resumable, placement, resolved, unbounded)
    return dataclasses.field(default=default, metadata={"fedlora": info})


def key(field_name: str) -> str:
    """The run-config key of a section field (``lora_rank`` -> ``lora-rank``)."""
    return field_name.replace("_", "-")


def fail(key: str, accepted: str, value: object) -> ConfigError:
    """The one-line error for a bad value: the key, what it accepts, what it got."""
    return ConfigError(f"{key}: must be {accepted}, got {value!r}")


def coerce(key: str, raw: Any, default: Any, *, unbounded: bool = False) -> Any:
    """Convert a run-config value to the type of the field's default, or fail naming the key.

    Floats are finite unless the key is ``unbounded`` (then ``inf`` is accepted); NaN is
    always refused.
    """
    if isinstance(default, bool):
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("true", "false", "1", "0"):
            return raw.lower() in ("true", "1")
        if isinstance(raw, int) and raw in (0, 1):
            return bool(raw)
        raise fail(key, "true or false", raw)
    if isinstance(default, int):
        if isinstance(raw, bool) or isinstance(raw, float) and not raw.is_integer():
            raise fail(key, "an integer", raw)
        try:
            return int(raw)
        except (TypeError, ValueError):
            raise fail(key, "an integer", raw) from None
    if isinstance(default, float):
        if isinstance(raw, bool):
            raise fail(key, "a number", raw)
        try:
            number = float(raw)
        except (TypeError, ValueError):
            raise fail(key, "a number", raw) from None
        if math.isnan(number) or (math.isinf(number) and not unbounded):
            raise fail(key, "a number (inf: no bound)" if unbounded else "a finite number", raw)
        return number
    if isinstance(default, tuple):
        items = raw.split(",") if isinstance(raw, str) else list(raw)
        return tuple(str(item).strip() for item in items if str(item).strip())
    if not isinstance(raw, str):
        raise fail(key, "a string", raw)
    return raw
