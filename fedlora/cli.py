"""The ``fedlora`` console command."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path
from typing import Any

from fedlora.api import DEFAULT_CLIENTS
from fedlora.config import RunConfig
from fedlora.errors import FedloraError

__all__ = ["main"]


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
    method = f"{summary.get('strategy', 'fedavg')} + {summary.get('personalization', 'dual')}"
    table = Table(title=f"fedlora ({method}): {len(summary['rounds'])} rounds, results in {out_dir}")
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
        else "upload per client per round: not measured (no client trained, or uploads masked by SecAgg+)"
    )
    down = final.get("bytes_down_per_client_round")
    if down:
        console.print(f"download per client per round (training): {_bytes(down)}")
    eps = final.get("epsilon_max")
    if eps is not None and not math.isnan(eps):
        console.print(
            f"DP-SGD: largest epsilon spent by a client {eps:.2f}; "
            f"{final.get('clients_out_of_budget', 0)} clients at their budget"
        )
    client_eps = final.get("client_dp_epsilon")
    if client_eps is not None and not math.isnan(client_eps):
        console.print(f"client-level DP: epsilon {client_eps:.2f} (server accountant)")
    mia = (final.get("mia_advantage_global"), final.get("mia_advantage_personalized"))
    if all(v is not None and not math.isnan(v) for v in mia):
        console.print(
            f"membership inference (loss threshold) advantage: global {mia[0]:.3f}, personalized {mia[1]:.3f}"
        )
    console.print(f"wall time: {final['wall_s']:.1f} s in the ServerApp")


def _simulate(args: argparse.Namespace) -> int:
    from fedlora.api import run
    from fedlora.launch import parse_overrides
    from fedlora.plots import plot_accuracy

    flat = parse_overrides(args.run_config or "")
    strategy = args.strategy or str(flat.pop("strategy", "fedavg"))
    personalization = args.personalization or str(flat.pop("personalization", "auto"))
    rounds = args.rounds if args.rounds is not None else flat.pop("num-server-rounds", None)
    overrides: dict[str, Any] = {k.replace("-", "_"): v for k, v in flat.items()}
    num_rounds = (
        int(rounds) if rounds is not None else int(RunConfig.from_flat(flat).federation.num_server_rounds)
    )
    progress, on_event = _progress(num_rounds)
    with progress:
        results = run(
            strategy=strategy,
            personalization=personalization,
            clients=args.clients,
            rounds=int(rounds) if rounds is not None else None,
            out=args.out,
            data=args.data,
            cpus_per_client=args.cpus_per_client,
            on_event=on_event,
            **overrides,
        )
    _table(results.summary, results.out_dir)
    print(f"accuracy per round: {plot_accuracy(results.summary, results.out_dir / 'accuracy.png')}")
    return 0


def _catalogue() -> str:
    from fedlora.personalization import PERSONALIZATIONS
    from fedlora.strategies import STRATEGIES

    lines = ["strategies (--strategy):"]
    lines += [f"  {name:<14} {info.summary}" for name, info in sorted(STRATEGIES.items())]
    lines += [
        "",
        "personalization methods (--personalization; auto = dual, or fedsa-lora under that strategy):",
    ]
    lines += [f"  {name:<14} {cls.summary}" for name, cls in sorted(PERSONALIZATIONS.items())]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    from fedlora.personalization import PERSONALIZATIONS
    from fedlora.strategies import STRATEGIES

    parser = argparse.ArgumentParser(
        prog="fedlora", description="Federated personalization with private LoRA adapters."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser(
        "simulate",
        help="run a simulated federation on this machine (through `flwr run`)",
        epilog=_catalogue(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sim.add_argument(
        "--clients",
        type=int,
        help=f"number of simulated clients (default {DEFAULT_CLIENTS}, or one per folder of --data)",
    )
    sim.add_argument("--rounds", type=int, help="federated rounds (run-config num-server-rounds)")
    sim.add_argument("--out", help="run directory for results (default runs/<timestamp>)")
    sim.add_argument("--data", help="folder with one subfolder per client holding train.jsonl and test.jsonl")
    sim.add_argument(
        "--strategy", help=f"aggregation strategy: {', '.join(sorted(STRATEGIES))} (default fedavg)"
    )
    sim.add_argument(
        "--personalization",
        help=f"personalization method: auto, {', '.join(sorted(PERSONALIZATIONS))} (default auto)",
    )
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
