"""The Flower app and run-config files of a simulated run: ``--run-config`` values as TOML, the app folder."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

from fedlora.config import RunConfig, Scalar
from fedlora.core.errors import ConfigError

__all__ = ["whole", "parse_overrides", "toml_value", "write_app", "write_run_config"]


def parse_overrides(text: str) -> dict[str, Scalar]:
    """Parse ``"k=v k2=v2"`` (TOML values; bare words are strings) into a flat dict.

    Raises
    ------
    ConfigError
        On a token without ``=``.

    """
    flat: dict[str, Scalar] = {}
    for token in text.split():
        key, sep, raw = token.partition("=")
        if not sep or not key:
            raise ConfigError(f"run-config: expected key=value, got {token!r}")
        try:
            flat[key] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            flat[key] = raw
    return flat


def toml_value(value: Scalar) -> str:
    """``value`` as a TOML value (strings quoted)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)


def whole(value: float) -> float | int:
    """``value`` as an integer where it is whole: Flower wants num-cpus=1, not 1.0."""
    return int(value) if float(value).is_integer() else value


def write_run_config(path: Path, cfg: RunConfig) -> Path:
    """Write ``cfg`` as a TOML file for ``flwr run --run-config``."""
    path.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in cfg.to_flat().items()))
    return path


def write_app(directory: Path, cfg: RunConfig) -> Path:
    """Write a Flower app folder (just a pyproject) whose components are fedlora's apps.

    The config section lists every run-config key, with ``cfg``'s values as defaults.
    """
    directory.mkdir(parents=True, exist_ok=True)
    lines = [
        "[build-system]",
        'requires = ["hatchling"]',
        'build-backend = "hatchling.build"',
        "",
        "[project]",
        'name = "fedlora-run"',
        'version = "0.1.0"',
        "dependencies = []",
        "",
        "[tool.hatch.build.targets.wheel]",
        'packages = ["."]',
        "",
        "[tool.flwr.app]",
        'publisher = "fedlora"',
        "",
        "[tool.flwr.app.components]",
        'serverapp = "fedlora.server_app:app"',
        'clientapp = "fedlora.client_app:app"',
        "",
        "[tool.flwr.app.config]",
        *(f"{key} = {toml_value(value)}" for key, value in cfg.to_flat().items()),
    ]
    (directory / "pyproject.toml").write_text("\n".join(lines) + "\n")
    return directory
