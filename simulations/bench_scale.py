"""Benchmark: round time and peak memory against the number of clients, 10 sampled per round.

The same federation, with 10 clients sampled for training and evaluation each round, is
run with 10, 100 and 1,000 clients in total. Clients keep their state on disk and load
their data lazily, so the clients that are never sampled should cost neither memory nor
time. Memory is the peak, over the run, of the summed resident set size of every process
of the run (Flower's SuperLink, the simulation with its Ray workers), sampled every 0.5 s;
round time is the mean wall time of rounds 2 and later (round 1 includes model loading).

Every client holds the same amount of data, so that which 10 are sampled does not change
the work of a round (with Shakespeare's natural roles, from 5 to 1,000+ lines, it does:
the sampled roles' size, not the federation's, sets the round time). Both workloads are
written as JSONL data folders (the layout a deployed device uses) with as many clients as
the largest federation, each with 16 training and 8 held-out examples:

* ``tiny``: a tiny random Llama learns Shakespeare by role: a client is 24 consecutive
  lines of one role (plays' roles cut into blocks, in order), its last 8 held out;
* ``minilm``: all-MiniLM-L6-v2 classifies BBC News topics from 24-word passages (a
  client holds the passages of one to three articles).

Usage:

    python simulations/bench_scale.py [--workload tiny minilm] [--totals 10 100 1000]
        [--sampled 10] [--rounds 4]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import threading
import uuid
from pathlib import Path

from fedlora.config import RunConfig
from fedlora.launch import parse_overrides, simulate

WORKLOADS = {
    "tiny": "model=tiny-llama task=causal-lm max-length=32",
    "minilm": "model=minilm task=classification max-length=32",
}
PASSAGE_WORDS = 24
TRAIN, TEST = 16, 8


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


def _write_clients(root: Path, examples: list[dict[str, str]], clients: int, source: str) -> Path:
    per_client = TRAIN + TEST
    if len(examples) < clients * per_client:
        raise SystemExit(f"{source} has {len(examples)} examples, {clients * per_client} needed")
    for c in range(clients):
        folder = root / f"client-{c:04d}"
        folder.mkdir(parents=True)
        mine = examples[c * per_client : (c + 1) * per_client]
        for split, records in (("train", mine[:TRAIN]), ("test", mine[TRAIN:])):
            (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def write_role_clients(root: Path, clients: int) -> Path:
    """``clients`` JSONL client folders, each ``TRAIN + TEST`` consecutive lines of one Shakespeare role."""
    from fedlora.data.shakespeare import role_lines, roles

    per_client = TRAIN + TEST
    lines: list[dict[str, str]] = []
    for role in roles(per_client):
        spoken = role_lines(role.play, role.name)
        whole = len(spoken) // per_client * per_client
        lines += [{"text": line} for line in spoken[:whole]]
    return _write_clients(root, lines, clients, "Shakespeare")


def write_passage_clients(root: Path, clients: int, seed: int = 0) -> tuple[Path, tuple[str, ...]]:
    """``clients`` JSONL client folders of BBC News passages; returns the folder and the labels.

    Articles are shuffled, cut into passages of ``PASSAGE_WORDS`` words (each keeps its
    article's topic) and dealt out in order, ``TRAIN + TEST`` to a client: the first
    ``TRAIN`` for training, the rest held out.
    """
    from fedlora.data.sources import load_corpus

    corpus = load_corpus("bbc-news")
    order = list(range(len(corpus.texts)))
    random.Random(seed).shuffle(order)
    passages = []
    for i in order:
        words = corpus.texts[i].split()
        label = corpus.label_names[corpus.labels[i]]
        passages += [
            {"text": " ".join(words[k : k + PASSAGE_WORDS]), "label": label}
            for k in range(0, len(words) - PASSAGE_WORDS + 1, PASSAGE_WORDS)
        ]
    return _write_clients(root, passages, clients, "BBC News"), corpus.label_names


def one_run(flat: dict, total: int, sampled: int, out: Path) -> tuple[float, float, int]:
    """(mean seconds of rounds 2+, peak MB, clients trained per round) with ``total`` clients."""
    fraction = sampled / total
    cfg = RunConfig.from_flat(
        {
            **flat,
            "fraction-train": fraction,
            "fraction-evaluate": fraction,
            "local-only-baseline": False,
            "audit-examples": 256,  # the last round includes the membership audit
        }
    )
    tag = f"FEDLORA_BENCH_SCALE={uuid.uuid4().hex}"
    key, value = tag.split("=")
    with PeakMemory(tag) as memory:
        summary = simulate(cfg, num_clients=total, out_dir=out, extra_env={key: value})
    ends = [r["wall_s"] for r in summary["rounds"]]
    later = [b - a for a, b in zip(ends, ends[1:], strict=False)]
    trained = max(r["clients_trained"] for r in summary["rounds"])
    return sum(later) / len(later), memory.peak / 2**20, trained


def bench(name: str, totals: list[int], sampled: int, rounds: int, tmp: Path) -> None:
    """Print one workload's rows and the ratios of the larger federations to the first."""
    flat = {**parse_overrides(WORKLOADS[name]), "num-server-rounds": rounds}
    if name == "minilm":
        data, labels = write_passage_clients(tmp / "bbc-passages", max(totals))
        flat.update({"data-dir": str(data), "labels": ",".join(labels)})
    else:
        flat["data-dir"] = str(write_role_clients(tmp / "role-lines", max(totals)))
    print(f"\n{name}: {sampled} clients sampled per round, {rounds} rounds, run config: {WORKLOADS[name]}")
    print(f"{'clients':>8} {'round s (2+)':>13} {'peak RSS MB':>12} {'trained/round':>14}")
    rows = []
    for total in totals:
        seconds, peak, trained = one_run(flat, total, sampled, tmp / f"{name}-{total}")
        rows.append((total, seconds, peak))
        print(f"{total:>8} {seconds:>13.2f} {peak:>12.0f} {trained:>14}", flush=True)
    base = rows[0]
    for total, seconds, peak in rows[1:]:
        print(
            f"{total} vs {base[0]} clients: round time x{seconds / base[1]:.2f}, "
            f"peak memory x{peak / base[2]:.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workload", nargs="+", choices=sorted(WORKLOADS), default=["tiny", "minilm"])
    parser.add_argument("--totals", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--sampled", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        for name in args.workload:
            bench(name, args.totals, args.sampled, args.rounds, Path(tmp))


if __name__ == "__main__":
    main()
