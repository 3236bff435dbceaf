"""``fedlora simulate``, ``resume`` and ``session``: simulated federations, their progress and results."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shlex
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fedlora import api
from fedlora.config import RunConfig
from fedlora.core.errors import FedloraError
from fedlora.core.rundir import CONFIG, RESPONSES, RunSummary, read_config
from fedlora.launch import SESSION_ENV, parse_overrides
from fedlora.launch.processes import terminate_as_interrupt
from fedlora.launch.session import BACKENDS
from fedlora.presets import PRESETS, get_preset
from fedlora.progress import RunProgress, pct

__all__ = ["add_simulate_commands"]

# The end-of-run table of clients lists this many at most, in partition order; all are in summary.json.
MAX_CLIENT_ROWS = 20


def _ppl(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.1f}"


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GB"


# What "accuracy" counts for each task: a language model's is over tokens, not answers.
_ACCURACY = {"causal-lm": "mean next-token accuracy", "chat": "mean reply-token accuracy"}


def _table(summary: dict[str, Any], out_dir: Path) -> None:
    record = RunSummary.from_dict(summary)
    final = record.final
    method = f"{record.strategy or 'fedavg'} + {record.personalization or 'dual'}"
    table = Table(title=f"fedlora ({method}): {len(record.rounds)} rounds, results in {out_dir}")
    table.add_column("model")
    task = str(read_config(out_dir).get("task", ""))
    table.add_column(_ACCURACY.get(task, "mean accuracy"), justify="right")
    table.add_column("worst-10% clients", justify="right")
    table.add_row("global adapter only", pct(final.global_accuracy), pct(final.global_accuracy_worst10))
    table.add_row(
        "personalized (global + personal)",
        pct(final.personalized_accuracy),
        pct(final.personalized_accuracy_worst10),
    )
    table.add_row(
        "local-only (no federation)",
        pct(final.local_only_accuracy),
        pct(final.local_only_accuracy_worst10),
    )
    console = Console()
    console.print(table)
    if final.personalized_perplexity is not None and not math.isnan(final.personalized_perplexity):
        # Causal LMs: the accuracies above are next-token (chat: response-token) accuracies.
        ppl = Table(title="held-out perplexity (lower is better)")
        for column in ("model", "mean over clients", "worst-10% clients"):
            ppl.add_column(column, justify="left" if column == "model" else "right")
        for name, model in (
            ("global adapter only", "global"),
            ("personalized (global + personal)", "personalized"),
            ("local-only (no federation)", "local_only"),
        ):
            ppl.add_row(
                name,
                _ppl(getattr(final, f"{model}_perplexity")),
                _ppl(getattr(final, f"{model}_perplexity_worst10")),
            )
        console.print(ppl)
    for versus, counts in (
        ("global", final.personalized_vs_global),
        ("local-only", final.personalized_vs_local_only),
    ):
        if counts:
            console.print(
                f"personalized vs {versus}: better on {counts['better']} clients, tied on {counts['tied']} "
                f"(within each client's own noise), worse on {counts['worse']}"
            )
    if not math.isnan(final.mix_weight):
        console.print(f"personal-mix: mean weight of the personalized model {final.mix_weight:.2f}")
    ratio = final.upload_reduction
    console.print(
        f"upload per client per round: {_bytes(final.bytes_up_per_client_round)} "
        f"(full fine-tuning: {_bytes(final.full_model_bytes)}, "
        f"{ratio:.0f}x smaller)"
        if ratio
        else "upload per client per round: not measured (no client trained, or uploads masked by SecAgg+)"
    )
    down = final.bytes_down_per_client_round
    if down:
        console.print(f"download per client per round (training): {_bytes(down)}")
    eps = final.epsilon_max
    if eps is not None and not math.isnan(eps):
        console.print(
            f"DP-SGD: largest epsilon spent by a client {eps:.2f}; "
            f"{final.clients_out_of_budget} clients at their budget"
        )
    client_eps = final.client_dp_epsilon
    if client_eps is not None and not math.isnan(client_eps):
        console.print(f"client-level DP: epsilon {client_eps:.2f} (server accountant)")
    mia = (final.mia_advantage_global, final.mia_advantage_personalized)
    if all(v is not None and not math.isnan(v) for v in mia):
        console.print(
            f"membership inference (loss threshold) advantage: global {mia[0]:.3f}, "
            f"personalized {mia[1]:.3f} (chance level {final.mia_advantage_chance:.3f}; "
            f"{final.mia_examples:.0f} training + held-out examples per client)"
        )
    evaluated = [r for r in record.rounds if r.evaluated]
    if len(evaluated) < len(record.rounds):
        measured = ", ".join(str(r.round) for r in evaluated)
        console.print(f"held-out accuracy measured in rounds {measured} (evaluate-every)")
    if len(evaluated) > 1 and evaluated[0].held_out_examples < evaluated[-1].held_out_examples:
        console.print(
            f"held-out examples measured: {evaluated[0].held_out_examples} in each earlier round "
            f"(a sample, eval-examples), {evaluated[-1].held_out_examples} in the last (all)"
        )
    console.print(f"wall time: {final.wall_s:.1f} s in the ServerApp")


# A per-client verdict (`fedlora.core.stats.Gain.verdict`), as the clients' table shows it.
_VERDICT = {1: "+", 0: "=", -1: "-"}


def _clients_table(results: api.Results) -> None:
    """Every client's final figures under its own name: held-out accuracy, or perplexity for causal LMs."""
    clients = results.per_client()
    if clients.empty:
        return
    metric, shown = ("perplexity", _ppl) if "personalized_perplexity" in clients else ("accuracy", pct)
    table = Table(title=f"held-out {metric} per client")
    # A name is kept whole where it fits (roles run to about 40 characters); other columns wrap.
    longest = max((len(str(c)) for c in clients["client"].head(MAX_CLIENT_ROWS)), default=6)
    table.add_column("client", overflow="fold", min_width=min(longest, 40))
    for model in ("global", "personalized", "local-only"):
        table.add_column(model, justify="right")
    for _, row in clients.head(MAX_CLIENT_ROWS).iterrows():
        figures = (row[f"{model}_{metric}"] for model in ("global", "personalized", "local_only"))
        glob, personal, local = (shown(float(v)) for v in figures)
        signs = "".join(_VERDICT.get(row[f"vs_{m}"], "?") for m in ("global", "local_only"))
        table.add_row(str(row["client"]), glob, f"{personal} {signs}", local)
    table.caption = (
        "after the personalized figure, against the global then the local-only model: "
        "+ better, = tied within the client's own noise, - worse, ? not measured"
    )
    console = Console()
    console.print(table)
    if len(clients) > MAX_CLIENT_ROWS:
        console.print(
            f"... and {len(clients) - MAX_CLIENT_ROWS} more clients (summary.json; "
            f"fedlora.load_results(DIR).per_client())"
        )


def _placement(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--gpus-per-client",
        type=float,
        default=0.0,
        help="GPUs per simulated client, fractions share one (0.25: four per GPU; default 0)",
    )
    parser.add_argument(
        "--ray-address",
        help="run on this existing Ray cluster (HOST:PORT of its head, from `ray start --head`; or auto)",
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        help="ray: clients on Ray actors, in parallel (the default); warm: no Ray, the run forked from one "
        "process that imports torch and transformers once, clients in turn (small runs start sooner). "
        f"Without it, a run joins the session ${SESSION_ENV} names (`fedlora session`), if set",
    )


def _session(args: argparse.Namespace) -> contextlib.AbstractContextManager[Any]:
    """The session of the run's ``--backend`` (``$FEDLORA_SESSION``'s where it runs on that backend).

    Without ``--backend``, nothing: the run joins ``$FEDLORA_SESSION``, else opens its own on Ray.
    """
    if args.backend is None:
        return contextlib.nullcontext()
    # A session for one run: its own Ray would cost what Flower's does. Refuses warm with an address.
    return api.session(backend=args.backend, warm_ray=False, ray_address=args.ray_address or "")


def _open_session(args: argparse.Namespace) -> int:
    """``fedlora session``: open a session, say how to join it, and keep it until Ctrl-C or SIGTERM."""
    os.environ.pop(SESSION_ENV, None)  # a session of its own, never one joined
    with api.session(backend=args.backend, ray_address=args.ray_address or "") as opened:
        began = time.monotonic()
        opened.ray()  # its Ray or warm process starts now, so that the first run starts warm too
        print(
            f"fedlora: session open ({opened.backend}, ready in {time.monotonic() - began:.0f} s). "
            "Runs in processes with this in their environment join it "
            "(`fedlora simulate`, `fedlora.run`, a notebook's kernel):"
        )
        print(f"export {SESSION_ENV}={shlex.quote(str(opened.root))}")
        print("Ctrl-C ends the session and stops its processes.", flush=True)
        try:
            with terminate_as_interrupt():
                while True:
                    time.sleep(3600)
        except KeyboardInterrupt:
            pass
    print("fedlora: session ended")
    return 0


def _simulate(args: argparse.Namespace) -> int:
    flat = parse_overrides(args.run_config or "")
    if args.preset:
        flat = {**get_preset(args.preset).config, **flat}
    strategy = args.strategy or str(flat.pop("strategy", "fedavg"))
    personalization = args.personalization or str(flat.pop("personalization", "auto"))
    rounds = args.rounds if args.rounds is not None else flat.pop("num-server-rounds", None)
    overrides: dict[str, Any] = {k.replace("-", "_"): v for k, v in flat.items()}
    # Checked like every key, so that `num-server-rounds=abc` stops with one line.
    given = {**flat, **({"num-server-rounds": rounds} if rounds is not None else {})}
    num_rounds = RunConfig.from_flat(given).federation.num_server_rounds
    with _session(args), RunProgress(num_rounds) as on_event:
        results = api.run(
            strategy=strategy,
            personalization=personalization,
            clients=args.clients,
            rounds=int(rounds) if rounds is not None else None,
            out=args.out,
            data=args.data,
            cpus_per_client=args.cpus_per_client,
            gpus_per_client=args.gpus_per_client,
            ray_address=args.ray_address or "",
            on_event=on_event,
            progress=False,  # shown here already
            preset=args.preset,
            overwrite=args.overwrite,
            **overrides,
        )
    _report(results)
    return 0


def _report(results: api.Results) -> None:
    _clients_table(results)
    _table(results.summary, results.out_dir)
    from fedlora.plots import plot_accuracy  # noqa: PLC0415 - heavy: matplotlib

    print(f"accuracy per round: {plot_accuracy(results.summary, results.out_dir / 'accuracy.png')}")
    if (results.out_dir / RESPONSES).is_file():
        print(f"global vs personalized replies to held-out prompts: {results.out_dir / RESPONSES}")


def _resume(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    if not (run_dir / CONFIG).is_file():
        raise FedloraError(f"{run_dir}: not a fedlora run directory (no {CONFIG})")
    saved = RunConfig.from_flat(read_config(run_dir)).federation.num_server_rounds
    rounds = args.rounds or saved
    with _session(args), RunProgress(rounds) as on_event:
        results = api.resume(
            run_dir,
            rounds=args.rounds,
            cpus_per_client=args.cpus_per_client,
            gpus_per_client=args.gpus_per_client,
            ray_address=args.ray_address or "",
            on_event=on_event,
            progress=False,  # shown here already
        )
    _report(results)
    return 0


def _catalogue() -> str:
    from fedlora.personalization import PERSONALIZATIONS  # noqa: PLC0415 - heavy: imports torch
    from fedlora.strategies import STRATEGIES  # noqa: PLC0415 - heavy: imports torch

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


def add_simulate_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``simulate``, ``resume`` and ``session`` to the ``fedlora`` parser.

    Parameters
    ----------
    sub : argparse._SubParsersAction
        The ``add_subparsers()`` object of the ``fedlora`` parser.

    """
    from fedlora.personalization import PERSONALIZATIONS  # noqa: PLC0415 - heavy: imports torch
    from fedlora.strategies import STRATEGIES  # noqa: PLC0415 - heavy: imports torch

    sim = sub.add_parser(
        "simulate",
        help="run a simulated federation on this machine (through `flwr run`)",
        epilog=_catalogue(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sim.add_argument(
        "--clients",
        type=int,
        help=(
            "number of simulated clients (default: one per folder of --data or natural id, "
            f"else {api.DEFAULT_CLIENTS})"
        ),
    )
    sim.add_argument("--preset", help=f"a named workload: {', '.join(PRESETS)} (listed below)")
    sim.add_argument("--rounds", type=int, help="federated rounds (run-config num-server-rounds)")
    sim.add_argument("--out", help="run directory for results (default runs/<timestamp>)")
    sim.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a finished or resumable run already in --out (refused without it)",
    )
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
    _placement(sim)
    sim.set_defaults(func=_simulate)
    res = sub.add_parser(
        "resume",
        help="go on with an interrupted run from its last checkpoint (same configuration, same clients)",
    )
    res.add_argument("run_dir", help="the run directory of the interrupted run")
    res.add_argument("--rounds", type=int, help="new total number of rounds (default: the run's own)")
    res.add_argument("--cpus-per-client", type=float, default=1.0, help="as for simulate (default 1)")
    _placement(res)
    res.set_defaults(func=_resume)
    ses = sub.add_parser(
        "session",
        help=f"keep a session (SuperLink, warm process) open for runs elsewhere to join (${SESSION_ENV})",
    )
    ses.add_argument(
        "--backend",
        choices=BACKENDS,
        default="warm",
        help="warm: runs forked from one process that imported torch and transformers (default); "
        "ray: a Ray of the session's own that every run joins",
    )
    ses.add_argument(
        "--ray-address", help="with --backend ray: an existing Ray cluster (HOST:PORT) to run on"
    )
    ses.set_defaults(func=_open_session)
