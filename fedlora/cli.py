"""The ``fedlora`` console command."""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

from fedlora.errors import FedloraError

__all__ = ["main"]

# The default benchmark: 20 clients with Dirichlet label skew over BBC News.
DEFAULT_CLIENTS = 20


def _pct(value: Any) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}%"


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GB"


def _progress(num_rounds: int) -> tuple[Any, Any]:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
        transient=False,
    )
    task = progress.add_task("starting Flower", total=num_rounds, status="")

    def on_event(event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "start":
            progress.update(task, description="federated rounds")
        elif kind == "round":
            progress.update(
                task,
                completed=event["round"],
                status=f"global {_pct(event['global_accuracy'])}  "
                f"personalized {_pct(event['personalized_accuracy'])}",
            )
        elif kind == "local-only":
            progress.update(
                task, description="local-only baseline", status=f"{event['steps']} steps per client"
            )
        elif kind == "client-error":
            progress.console.print(
                f"[yellow]client error (round {event['round']}, node {event['node']}): "
                f"{event['reason'][:200]}"
            )

    return progress, on_event


def _table(summary: dict[str, Any], out_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    final = summary["final"]
    table = Table(title=f"fedlora: {len(summary['rounds'])} rounds, results in {out_dir}")
    table.add_column("model")
    table.add_column("mean accuracy", justify="right")
    table.add_column("worst-10% clients", justify="right")
    table.add_row(
        "global adapter only", _pct(final["global_accuracy"]), _pct(final["global_accuracy_worst10"])
    )
    table.add_row(
        "personalized (global + personal)",
        _pct(final["personalized_accuracy"]),
        _pct(final["personalized_accuracy_worst10"]),
    )
    table.add_row(
        "local-only (no federation)",
        _pct(final["local_only_accuracy"]),
        _pct(final["local_only_accuracy_worst10"]),
    )
    console = Console()
    console.print(table)
    ratio = final.get("upload_reduction")
    console.print(
        f"upload per client per round: {_bytes(final['bytes_up_per_client_round'])} "
        f"(full fine-tuning: {_bytes(final['full_model_bytes'])}, "
        f"{ratio:.0f}x smaller)"
        if ratio
        else "no client trained"
    )
    console.print(f"wall time: {final['wall_s']:.1f} s in the ServerApp")


def _simulate(args: argparse.Namespace) -> int:
    from fedlora.config import RunConfig
    from fedlora.launch import parse_overrides, simulate

    flat = parse_overrides(args.run_config or "")
    if args.rounds is not None:
        flat["num-server-rounds"] = args.rounds
    if args.data is not None:
        flat["data-dir"] = str(Path(args.data).expanduser().resolve())
    if args.strategy is not None:
        flat["strategy"] = args.strategy
    cfg = RunConfig.from_flat(flat)
    clients = args.clients
    if clients is None:
        from fedlora.data.jsonl import client_folders

        clients = len(client_folders(cfg.data.data_dir)) if cfg.data.data_dir else DEFAULT_CLIENTS
    out_dir = Path(args.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
    progress, on_event = _progress(cfg.federation.num_server_rounds)
    with progress:
        summary = simulate(
            cfg, num_clients=clients, out_dir=out_dir, cpus_per_client=args.cpus_per_client, on_event=on_event
        )
    _table(summary, out_dir.resolve())
    from fedlora.plots import plot_accuracy

    print(f"accuracy per round: {plot_accuracy(summary, out_dir.resolve() / 'accuracy.png')}")
    return 0


def _parser() -> argparse.ArgumentParser:
    from fedlora.strategies import STRATEGIES

    parser = argparse.ArgumentParser(
        prog="fedlora", description="Federated personalization with private LoRA adapters."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="run a simulated federation on this machine (through `flwr run`)")
    sim.add_argument(
        "--clients",
        type=int,
        help=f"number of simulated clients (default {DEFAULT_CLIENTS}, or one per folder of --data)",
    )
    sim.add_argument("--rounds", type=int, help="federated rounds (run-config num-server-rounds)")
    sim.add_argument("--out", help="run directory for results (default runs/<timestamp>)")
    sim.add_argument("--data", help="folder with one subfolder per client holding train.jsonl and test.jsonl")
    sim.add_argument("--strategy", help=f"aggregation strategy: {', '.join(sorted(STRATEGIES))}")
    sim.add_argument("--run-config", help='more run-config overrides, e.g. "lora-rank=4 local-steps=10"')
    sim.add_argument(
        "--cpus-per-client",
        type=float,
        default=1.0,
        help="CPU cores per simulated client; cores / this = clients trained at once (default 1)",
    )
    sim.set_defaults(func=_simulate)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fedlora`` command."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args))
    except FedloraError as err:
        print(f"fedlora: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
