"""Flower ServerApp: parse the run config once and hand over to `fedlora.server.loop`."""

from __future__ import annotations

import logging
import sys

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedlora.config import RunConfig
from fedlora.core.errors import FedloraError
from fedlora.core.rundir import ERROR_LINE

__all__ = ["app"]

app = ServerApp()
log = logging.getLogger("fedlora")


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run one fedlora federation with the run's configuration."""
    if not log.handlers:
        # Flower streams the ServerApp's output to `flwr run --stream` and `flwr log`.
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    try:
        from fedlora.server.loop import run_federation  # noqa: PLC0415 - heavy: imports torch

        run_federation(grid, RunConfig.from_flat(context.run_config), context)
    except Exception as err:
        # One line naming the real error (a full disk, a refused out-dir); Flower prints the traceback.
        log.error(
            "%s %s", ERROR_LINE, err if isinstance(err, FedloraError) else f"{type(err).__name__}: {err}"
        )
        raise
