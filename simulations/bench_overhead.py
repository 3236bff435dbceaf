"""Benchmark: federation wall time through Flower vs the same local work in one plain process.

The plain loop runs exactly the client work of the federation (for every round and
client: train the shared adapter; after FedAvg, train the personal adapter and evaluate
global and personalized) with
the same library functions, one thread, in this process, plus FedAvg's weighted mean.
The federation runs through `flwr run` (Ray simulation); its time is taken from the
ServerApp's own clock, from the start of round 1 (after Flower's one-off start-up) to
the end of the last round. Both run in this one invocation, so they share the machine's
load. Usage:

    python simulations/bench_overhead.py [--clients 10] [--rounds 5] [--cpus-per-client 1]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from fedlora.config import RunConfig
from fedlora.data.federated import load_client_data, resolve_labels
from fedlora.launch import parse_overrides, simulate
from fedlora.lora.protocol import ClientView
from fedlora.models import build_model
from fedlora.personalization.base import Local
from fedlora.personalization.dual import Dual
from fedlora.train import tokenize
from fedlora.train.local import evaluate_adapter, train_shared


def plain_loop(cfg: RunConfig, clients: int) -> list[float]:
    """Seconds per round of the same client work, run serially in this process."""
    torch.set_num_threads(1)
    task = cfg.model.task
    labels = resolve_labels(cfg.data, task)
    loaded = build_model(cfg.model, len(labels), seed=cfg.federation.seed)
    data = [load_client_data(cfg.data, task, pid, clients, cfg.federation.seed) for pid in range(clients)]
    tok = loaded.tokenizer
    splits = [
        (
            tokenize(tok, d.train_texts, d.train_labels, cfg.model.max_length),
            tokenize(tok, d.test_texts, d.test_labels, cfg.model.max_length),
        )
        for d in data
    ]
    global_state = loaded.initial_global
    personal: list[dict | None] = [None] * clients
    times = []
    for server_round in range(1, cfg.federation.num_server_rounds + 1):
        start = time.perf_counter()
        shared = [
            train_shared(loaded, train, global_state, cfg.train, seed=server_round * 100 + i)[0]
            for i, (train, _) in enumerate(splits)
        ]
        weights = torch.tensor([float(d.num_train) for d in data])
        weights /= weights.sum()
        global_state = {k: sum(w * s[k] for w, s in zip(weights, shared, strict=True)) for k in global_state}
        view = ClientView(global_state, global_state)
        for i, (train, test) in enumerate(splits):
            local = Local(loaded, train, test, view, cfg.train, seed=i)
            personal[i] = Dual().update(local, personal[i])[0]
            evaluate_adapter(loaded, test, global_state)
            Dual().evaluate(local, personal[i])
        times.append(time.perf_counter() - start)
    return times


def federation(cfg: RunConfig, clients: int, cpus_per_client: float) -> list[float]:
    """Seconds per round of the same federation through Flower, from the ServerApp's clock."""
    with tempfile.TemporaryDirectory() as tmp:
        simulate(cfg, num_clients=clients, out_dir=Path(tmp) / "run", cpus_per_client=cpus_per_client)
        events = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    start = next(e["t"] for e in events if e["event"] == "start")
    ends = [e["t"] for e in events if e["event"] == "round"]
    return [b - a for a, b in zip([start, *ends[:-1]], ends, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cpus-per-client", type=float, nargs="+", default=[1.0, 2.0])
    parser.add_argument("--run-config", default="")
    args = parser.parse_args()
    flat = parse_overrides(args.run_config)
    flat.update({"num-server-rounds": args.rounds, "local-only-baseline": False})
    cfg = RunConfig.from_flat(flat)
    plain = plain_loop(cfg, args.clients)
    print(
        f"{args.clients} clients x {args.rounds} rounds, model {cfg.model.model}, "
        f"{cfg.train.local_steps}+{cfg.train.personal_steps} steps of batch {cfg.train.batch_size}"
    )
    rounds = ", ".join(f"{t:.1f}" for t in plain)
    print(f"plain loop, 1 process, 1 thread: {sum(plain):.1f} s  (rounds: {rounds})")
    for cpus in args.cpus_per_client:
        fed = federation(cfg, args.clients, cpus)
        print(
            f"Flower, client-resources-num-cpus={cpus:g}: {sum(fed):.1f} s  "
            f"(rounds: {', '.join(f'{t:.1f}' for t in fed)})  "
            f"overhead ratio {sum(fed) / sum(plain):.2f}  "
            f"rounds 2+ {sum(fed[1:]) / sum(plain[1:]):.2f}"
        )


if __name__ == "__main__":
    main()
