"""Launching a simulated federation with `flwr run`, offline, and cleaning up after it.

One concern a module: `checks` (everything refused before Flower starts), `appfiles` (the
Flower app and run-config files), `processes` (Flower's environment and stopping its
processes), `session` (a SuperLink, and a warm Ray, shared by several runs) and `run`
(one run: `simulate`).
"""

from fedlora.launch.appfiles import parse_overrides, toml_value, write_app, write_run_config
from fedlora.launch.checks import check_gpus, check_layout, preflight, refuse_finished_run
from fedlora.launch.processes import FLOWER_ENV, flower_env, flower_script, free_port
from fedlora.launch.run import last_error, read_events, simulate
from fedlora.launch.session import FlowerSession, flower_session

__all__ = [
    "FLOWER_ENV",
    "FlowerSession",
    "check_gpus",
    "check_layout",
    "flower_env",
    "flower_script",
    "flower_session",
    "free_port",
    "last_error",
    "parse_overrides",
    "preflight",
    "read_events",
    "refuse_finished_run",
    "simulate",
    "toml_value",
    "write_app",
    "write_run_config",
]
