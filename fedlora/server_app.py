"""Flower ServerApp: parse the run config once and hand over to `fedlora.server.loop`."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedlora.config import RunConfig

__all__ = ["app"]

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run one fedlora federation with the run's configuration."""
    from fedlora.server.loop import run_federation  # noqa: PLC0415 - heavy: imports torch

    run_federation(grid, RunConfig.from_flat(context.run_config), context)
