"""Benchmark: what evaluation adds to a round, and what the last round adds to an ordinary one.

Simulated federations of the same workload on one SuperLink, in alternating pairs (the
machine is shared and noisy): training only (``evaluate-every`` beyond the run, so only
the last round measures) and ``evaluate-every=1`` (the default: every round measures the
global and personalized adapters on each client's held-out split, rounds before the last
on a sample of at most ``eval-examples``). Both train the same shared and personal steps
every round. A round's time is the difference of the server's wall clock at the end of
consecutive rounds; round 1 (workers loading the model) is left out of "ordinary", and
medians are taken over every pair. Usage:

    python simulations/bench_rounds.py [--clients 20] [--rounds 5] [--repeats 2] [--run-config "..."]

Prints both runs' round times, the held-out examples measured in each round, and the two
ratios: an ordinary round with evaluation over one without, and the last round (which
measures every held-out example, and runs the membership audit where ``audit-examples``
turns it on) over an ordinary evaluated round.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import fedlora
from fedlora.launch import flower_session, parse_overrides


def round_seconds(summary: dict) -> list[float]:
    """Each round's duration from the cumulative wall clock the server records."""
    ends = [r["wall_s"] for r in summary["rounds"]]
    return [b - a for a, b in zip([0.0, *ends[:-1]], ends, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2, help="pairs of runs, alternating (a noisy machine)")
    parser.add_argument("--run-config", default="", help="more run-config overrides, as for fedlora simulate")
    args = parser.parse_args()
    extra = {k.replace("-", "_"): v for k, v in parse_overrides(args.run_config).items()}
    common = {"clients": args.clients, "rounds": args.rounds, "local_only_baseline": False, **extra}
    times: dict[str, list[list[float]]] = {"training only": [], "evaluated": []}
    with tempfile.TemporaryDirectory() as tmp, flower_session() as session:
        for repeat in range(args.repeats):
            for label, every in (("training only", args.rounds + 1), ("evaluated", 1)):
                out = Path(tmp) / f"{repeat}-{every}"
                result = fedlora.run(out=out, session=session, evaluate_every=every, **common)
                times[label].append(round_seconds(result.summary))
                held_out = [r["held_out_examples"] for r in result.summary["rounds"]]
                print(
                    f"{label:14} round seconds: {', '.join(f'{t:.1f}' for t in times[label][-1])}; "
                    f"held-out examples measured: {', '.join(map(str, held_out))}",
                    flush=True,
                )
    # Medians over every repeat's ordinary rounds (2 to the one before the last), and last rounds.
    ordinary = statistics.median(t for run in times["evaluated"] for t in run[1:-1])
    training = statistics.median(t for run in times["training only"] for t in run[1:-1])
    last = statistics.median(run[-1] for run in times["evaluated"])
    ratio = ordinary / training
    print(f"ordinary round, evaluated / training only: {ordinary:.1f} s / {training:.1f} s = {ratio:.2f}")
    print(f"last round / ordinary evaluated round: {last:.1f} s / {ordinary:.1f} s = {last / ordinary:.2f}")


if __name__ == "__main__":
    main()
