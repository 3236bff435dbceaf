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
from fedlora.core.errors import FedloraError

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
    ppl = [final.get(f"{k}_perplexity") for k in ("global", "personalized", "local_only")]
    if ppl[1] is not None and not math.isnan(ppl[1]):
        # Causal LMs: the accuracies above are next-token accuracies on the held-out lines.
        shown = ["-" if v is None or math.isnan(v) else f"{v:.1f}" for v in ppl]
        console.print(
            f"held-out perplexity (mean over clients): global {shown[0]}, personalized {shown[1]}, "
            f"local-only {shown[2]}"
        )
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
            f"membership inference (loss threshold) advantage: global {mia[0]:.3f}, "
            f"personalized {mia[1]:.3f} (chance level {final.get('mia_advantage_chance', math.nan):.3f})"
        )
    console.print(f"wall time: {final['wall_s']:.1f} s in the ServerApp")


def _simulate(args: argparse.Namespace) -> int:
    from fedlora.api import run
    from fedlora.launch import parse_overrides
    from fedlora.plots import plot_accuracy

    flat = parse_overrides(args.run_config or "")
    if args.preset:
        from fedlora.presets import get_preset

        flat = {**get_preset(args.preset).config, **flat}
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
            preset=args.preset,
            **overrides,
        )
    _table(results.summary, results.out_dir)
    print(f"accuracy per round: {plot_accuracy(results.summary, results.out_dir / 'accuracy.png')}")
    return 0


def _resume(args: argparse.Namespace) -> int:
    import json

    from fedlora.api import resume
    from fedlora.plots import plot_accuracy

    run_dir = Path(args.run_dir)
    config = run_dir / "config.json"
    if not config.is_file():
        raise FedloraError(f"{run_dir}: not a fedlora run directory (no config.json)")
    rounds = args.rounds or int(json.loads(config.read_text())["num-server-rounds"])
    progress, on_event = _progress(rounds)
    with progress:
        results = resume(run_dir, rounds=args.rounds, cpus_per_client=args.cpus_per_client, on_event=on_event)
    _table(results.summary, results.out_dir)
    print(f"accuracy per round: {plot_accuracy(results.summary, results.out_dir / 'accuracy.png')}")
    return 0


def _audit(args: argparse.Namespace) -> int:
    """Print a finished run's privacy figures, and check its wire log."""
    import json
    import statistics

    from rich.console import Console

    from fedlora.api import load_results
    from fedlora.privacy.canary import SPACE

    run_dir = Path(args.run_dir)
    if not (run_dir / "summary.json").exists():
        raise FedloraError(f"{run_dir}: not a finished fedlora run (no summary.json)")
    result = load_results(run_dir)
    final, clients = result.final, result.summary["per_client"]["final_round"]
    config = json.loads((run_dir / "config.json").read_text())
    console = Console()
    console.print(f"run {run_dir}: {result.strategy} + {result.personalization}, {len(clients)} clients")

    spent = [c["epsilon"] for c in clients.values() if "epsilon" in c]
    if spent:
        console.print(
            f"DP-SGD (sample level, delta {config['dp-delta']:g}): epsilon per client "
            f"min {min(spent):.3f}, median {statistics.median(spent):.3f}, max {max(spent):.3f}; "
            f"{final['clients_out_of_budget']} clients at their budget "
            + (
                "(shared and personal adapters)"
                if config.get("dp-personal", True)
                else "(shared adapter only)"
            )
        )
    else:
        console.print("DP-SGD: off")
    client_eps = final.get("client_dp_epsilon")
    if client_eps is not None and not math.isnan(client_eps):
        console.print(
            f"client-level DP ({config['client-dp']}): epsilon {client_eps:.3f} (server accountant)"
        )
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    secure = [e for e in events if e["event"] == "secure-aggregate"]
    if secure:
        seen = sorted({e["distinct_uploads_seen"] for e in secure})
        console.print(
            f"secure aggregation (SecAgg+): {len(secure)} rounds; the strategy was handed "
            f"{'/'.join(map(str, seen))} distinct vector(s) per round (the aggregate), never an upload"
        )
    mia = [c for c in clients.values() if "mia_advantage_global" in c]
    if mia:
        g = [c["mia_advantage_global"] for c in mia]
        p = [c["mia_advantage_personalized"] for c in mia]
        console.print(
            f"membership inference (loss threshold, final models): advantage global "
            f"{statistics.fmean(g):.3f} (max {max(g):.3f}), personalized "
            f"{statistics.fmean(p):.3f} (max {max(p):.3f}), over {len(mia)} clients; chance level "
            f"{statistics.fmean(c.get('mia_advantage_chance', math.nan) for c in mia):.3f}"
        )
    canary = final.get("canary_exposure_personalized")
    if canary is not None and not math.isnan(canary):
        console.print(
            f"canary exposure (client {config['canary-client']}, {config['canary-repeats']} repeats): global "
            f"{final['canary_exposure_global']:.2f} bits, personalized {canary:.2f} bits "
            f"(max {math.log2(SPACE):.1f}; about 1 means not memorised)"
        )
    wire = args.wire or config.get("audit-wire-log") or ""
    if wire:
        from fedlora.privacy.wire import audit_wire_log

        keys = json.loads((run_dir / "global_adapter" / "adapter_keys.json").read_text())
        audit = audit_wire_log(wire, keys)
        kinds = ", ".join(f"{n} {t}" for t, n in sorted(audit.by_type.items()))
        console.print(
            f"wire ({wire}): {audit.replies} replies ({kinds}); adapter tensors in the clear: "
            f"{len(audit.array_keys)} keys; SecAgg+ protocol replies: {audit.secagg_replies}; "
            + ("only adapter tensors, scalar metrics and SecAgg+ messages" if audit.clean else "NOT CLEAN")
        )
        for violation in audit.violations[:20]:
            console.print(f"  {violation}")
        return 0 if audit.clean else 1
    return 0


def _export(args: argparse.Namespace) -> int:
    """Write a client's personalized model as a plain transformers model."""
    from fedlora.export import client_state_file, export_client

    state = client_state_file(Path(args.source), args.client)
    result = export_client(state, Path(args.out), verify=not args.no_verify)
    print(f"exported {state} -> {result.out_dir} ({result.task})")
    if not math.isnan(result.max_logit_difference):
        accuracy = "" if math.isnan(result.accuracy) else f"; held-out accuracy {100 * result.accuracy:.1f}%"
        print(
            f"checked on the client's held-out examples: merged model vs personalized model, "
            f"largest logit difference {result.max_logit_difference:.2e}{accuracy}"
        )
    return 0


def _texts(args: argparse.Namespace) -> list[str]:
    texts = list(args.text or [])
    if args.file:
        path = Path(args.file)
        if not path.is_file():
            raise FedloraError(f"--file: {path} does not exist")
        texts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not texts:
        raise FedloraError("give text to run the model on: TEXT arguments or --file FILE (one text per line)")
    return texts


def _predict(args: argparse.Namespace) -> int:
    from fedlora.export import predict

    texts = _texts(args)
    for text, (label, prob) in zip(texts, predict(Path(args.model_dir), texts), strict=True):
        print(f"{label}\t{prob:.3f}\t{text[:80]}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from fedlora.export import generate

    for prompt in _texts(args):
        print(prompt + generate(Path(args.model_dir), prompt, max_new_tokens=args.max_new_tokens))
    return 0


def _add_model_commands(sub: Any) -> None:
    export = sub.add_parser(
        "export",
        help="write a client's personalized model (adapters merged into the base) for plain transformers",
    )
    export.add_argument("source", help="a run directory, a device's state-dir, or a client's .state file")
    export.add_argument("--client", type=int, help="which client of a run directory (default 0)")
    export.add_argument("--out", required=True, help="folder for the model")
    export.add_argument(
        "--no-verify", action="store_true", help="skip comparing the merged model with the client's own"
    )
    export.set_defaults(func=_export)
    for name, helptext, func in (
        ("predict", "classify text with an exported model", _predict),
        ("generate", "continue text with an exported causal LM", _generate),
    ):
        command = sub.add_parser(name, help=helptext)
        command.add_argument("model_dir", help="a folder written by `fedlora export`")
        command.add_argument("text", nargs="*", help="texts (or prompts)")
        command.add_argument("--file", help="a file with one text per line")
        if name == "generate":
            command.add_argument("--max-new-tokens", type=int, default=40, help="tokens to add (default 40)")
        command.set_defaults(func=func)


def _catalogue() -> str:
    from fedlora.personalization import PERSONALIZATIONS
    from fedlora.presets import PRESETS
    from fedlora.strategies import STRATEGIES

    lines = ["presets (--preset):"]
    lines += [f"  {name:<14} {p.summary} ({p.clients} clients)" for name, p in PRESETS.items()]
    lines += ["", "strategies (--strategy):"]
    lines += [f"  {name:<14} {info.summary}" for name, info in sorted(STRATEGIES.items())]
    lines += [
        "",
        "personalization methods (--personalization; auto = dual, or fedsa-lora under that strategy):",
    ]
    lines += [f"  {name:<14} {cls.summary}" for name, cls in sorted(PERSONALIZATIONS.items())]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    from fedlora.deploy import add_deploy_commands
    from fedlora.personalization import PERSONALIZATIONS
    from fedlora.presets import PRESETS
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
    sim.add_argument("--preset", help=f"a named workload: {', '.join(PRESETS)} (listed below)")
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
    res = sub.add_parser(
        "resume",
        help="go on with an interrupted run from its last checkpoint (same configuration, same clients)",
    )
    res.add_argument("run_dir", help="the run directory of the interrupted run")
    res.add_argument("--rounds", type=int, help="new total number of rounds (default: the run's own)")
    res.add_argument("--cpus-per-client", type=float, default=1.0, help="as for simulate (default 1)")
    res.set_defaults(func=_resume)
    audit = sub.add_parser(
        "audit",
        help="print a finished run's privacy figures (epsilon, membership inference, canary, wire log)",
    )
    audit.add_argument("run_dir", help="a run directory written by `fedlora simulate` or `fedlora.run`")
    audit.add_argument(
        "--wire",
        help="wire log to check (default: the run's audit-wire-log, if it set one); exit 1 if not clean",
    )
    audit.set_defaults(func=_audit)
    _add_model_commands(sub)
    add_deploy_commands(sub)
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
