"""Launching a simulated federation with `flwr run`, offline, and cleaning up after it.

One concern a module: `checks` (everything refused before Flower starts), `appfiles` (the
Flower app and run-config files), `processes` (Flower's environment and stopping its
processes), `session` (a SuperLink, and a warm Ray or process, shared by several runs, and
by other processes through ``$FEDLORA_SESSION``) and `run`
(one run: `simulate`).
"""

from fedlora.launch.appfiles import parse_overrides, toml_value, write_app, write_run_config
from fedlora.launch.checks import check_gpus, check_layout, preflight, refuse_finished_run
from fedlora.launch.processes import FLOWER_ENV, flower_env, flower_script, free_port
from fedlora.launch.run import last_error, read_events, simulate
from fedlora.launch.session import SESSION_ENV, FlowerSession, flower_session, joined_session

__all__ = [
    "FLOWER_ENV",
    "SESSION_ENV",
    "FlowerSession",
    "check_gpus",
    "check_layout",
    "flower_env",
    "flower_script",
    "flower_session",
    "free_port",
    "joined_session",
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
