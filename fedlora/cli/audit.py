"""``fedlora audit``: a finished run's privacy figures, and a check of its wire log."""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from rich.console import Console

from fedlora import api
from fedlora.core.errors import FedloraError
from fedlora.core.rundir import GLOBAL_ADAPTER, METRICS, SUMMARY, read_config

__all__ = ["add_audit_command"]


def _audit(args: argparse.Namespace) -> int:
    """Print a finished run's privacy figures, and check its wire log."""
    run_dir = Path(args.run_dir)
    if not (run_dir / SUMMARY).exists():
        raise FedloraError(f"{run_dir}: not a finished fedlora run (no {SUMMARY})")
    result = api.load_results(run_dir)
    final, clients = result.record.final, result.record.per_client.clients()
    config = read_config(run_dir)
    console = Console()
    console.print(f"run {run_dir}: {result.strategy} + {result.personalization}, {len(clients)} clients")

    spent = [c.epsilon for c in clients.values() if c.epsilon is not None]
    if spent:
        console.print(
            f"DP-SGD (sample level, delta {config['dp-delta']:g}): epsilon per client "
            f"min {min(spent):.3f}, median {statistics.median(spent):.3f}, max {max(spent):.3f}; "
            f"{final.clients_out_of_budget} clients at their budget "
            + (
                "(shared and personal adapters)"
                if config.get("dp-personal", True)
                else "(shared adapter only)"
            )
        )
    else:
        console.print("DP-SGD: off")
    client_eps = final.client_dp_epsilon
    if client_eps is not None and not math.isnan(client_eps):
        console.print(
            f"client-level DP ({config['client-dp']}): epsilon {client_eps:.3f} (server accountant)"
        )
    events = [json.loads(line) for line in (run_dir / METRICS).read_text().splitlines()]
    secure = [e for e in events if e["event"] == "secure-aggregate"]
    if secure:
        seen = sorted({e["distinct_uploads_seen"] for e in secure})
        console.print(
            f"secure aggregation (SecAgg+): {len(secure)} rounds; the strategy was handed "
            f"{'/'.join(map(str, seen))} distinct vector(s) per round (the aggregate), never an upload"
        )
    mia = [c for c in clients.values() if c.mia_advantage_global is not None]
    if mia:
        g = [float(c.mia_advantage_global or 0.0) for c in mia]
        p = [float(c.mia_advantage_personalized or 0.0) for c in mia]
        chance = [float(c.mia_advantage_chance or 0.0) for c in mia]
        console.print(
            f"membership inference (loss threshold, final models): advantage global "
            f"{statistics.fmean(g):.3f} (max {max(g):.3f}), personalized "
            f"{statistics.fmean(p):.3f} (max {max(p):.3f}), over {len(mia)} clients; chance level "
            f"{statistics.fmean(chance):.3f}"
        )
    else:
        console.print("membership inference: not run (opt-in: `audit-examples=256` in the run config)")
    canary = final.canary_exposure_personalized
    if canary is not None and not math.isnan(canary):
        from fedlora.privacy.canary import SPACE  # noqa: PLC0415 - the privacy package imports Opacus

        console.print(
            f"canary exposure (client {config['canary-client']}, {config['canary-repeats']} repeats): global "
            f"{final.canary_exposure_global:.2f} bits, personalized {canary:.2f} bits "
            f"(max {math.log2(SPACE):.1f}; about 1 means not memorised)"
        )
    wire = args.wire or config.get("audit-wire-log") or ""
    if wire:
        keys = json.loads((run_dir / GLOBAL_ADAPTER / "adapter_keys.json").read_text())
        from fedlora.privacy.wire import audit_wire_log  # noqa: PLC0415 - heavy: Flower

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


def add_audit_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``audit`` to the ``fedlora`` parser.

    Parameters
    ----------
    sub : argparse._SubParsersAction
        The ``add_subparsers()`` object of the ``fedlora`` parser.

    """
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
