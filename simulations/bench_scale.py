"""Benchmark: round time and peak memory against the number of clients, 10 sampled per round.

The same federation (same 10 clients sampled for training and evaluation each round) is
run with 10, 100 and 1,000 clients in total. Clients keep their state on disk and load
their data lazily, so the clients that are never sampled should cost neither memory nor
time. Memory is the peak, over the run, of the summed resident set size of every process
of the run (Flower's SuperLink, the simulation with its Ray workers), sampled every 0.5 s;
round time is the mean wall time of rounds 2 and later (round 1 includes model loading).
Usage:

    python simulations/bench_scale.py [--totals 10 100 1000] [--sampled 10] [--rounds 4]
        [--run-config "model=tiny-llama task=causal-lm dataset=..."]
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import uuid
from pathlib import Path

from fedlora.config import RunConfig
from fedlora.launch import parse_overrides, simulate


def _rss_of_marked(marker: bytes) -> int:
    """Summed resident set size (bytes) of every process whose environment holds ``marker``."""
    total = 0
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if marker not in (proc / "environ").read_bytes().split(b"\0"):
                continue
            for line in (proc / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except (OSError, ValueError):
            continue
    return total


class PeakMemory:
    """Samples the summed RSS of the marked processes in a background thread."""

    def __init__(self, marker: str) -> None:
        self.marker = marker.encode()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self.peak = max(self.peak, _rss_of_marked(self.marker))

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def one_run(flat: dict, total: int, sampled: int, out: Path) -> tuple[float, float, int]:
    """(mean seconds of rounds 2+, peak MB, clients trained per round) with ``total`` clients."""
    fraction = sampled / total
    cfg = RunConfig.from_flat(
        {**flat, "fraction-train": fraction, "fraction-evaluate": fraction, "local-only-baseline": False}
    )
    tag = f"FEDLORA_BENCH_SCALE={uuid.uuid4().hex}"
    key, value = tag.split("=")
    with PeakMemory(tag) as memory:
        summary = simulate(cfg, num_clients=total, out_dir=out, extra_env={key: value})
    ends = [r["wall_s"] for r in summary["rounds"]]
    later = [b - a for a, b in zip(ends, ends[1:], strict=False)]
    trained = max(r["clients_trained"] for r in summary["rounds"])
    return sum(later) / len(later), memory.peak / 2**20, trained


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--totals", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--sampled", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--run-config", default="model=tiny-bert max-length=32")
    args = parser.parse_args()
    flat = {**parse_overrides(args.run_config), "num-server-rounds": args.rounds}
    print(f"{args.sampled} clients sampled per round, {args.rounds} rounds, run config: {args.run_config}")
    print(f"{'clients':>8} {'round s (2+)':>13} {'peak RSS MB':>12} {'trained/round':>14}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        for total in args.totals:
            seconds, peak, trained = one_run(flat, total, args.sampled, Path(tmp) / f"n{total}")
            rows.append((total, seconds, peak))
            print(f"{total:>8} {seconds:>13.2f} {peak:>12.0f} {trained:>14}")
    base = rows[0]
    for total, seconds, peak in rows[1:]:
        print(
            f"{total} vs {base[0]} clients: round time x{seconds / base[1]:.2f}, "
            f"peak memory x{peak / base[2]:.2f}"
        )


if __name__ == "__main__":
    main()
