"""Benchmark: peak memory (RSS) and time of one client process per device profile.

Each profile runs in a fresh interpreter that does exactly what a SuperNode's ClientApp
process does in one round: receive the global adapter, train the shared adapter
(``train``), then train the personal adapter and evaluate (``evaluate``), through
fedlora's ClientApp with its node config (``profile=...``). The peak resident set size
of that process is read from the kernel (``ru_maxrss``) after the round, and again
after only importing and loading the model, to separate the fixed cost from the
training's. Usage:

    python simulations/bench_profiles.py [--run-config "strategy=flexlora max-length=128"]

The default run config uses a strategy that takes mixed ranks (flexlora) and 128-token
inputs, so that every cap of a profile (rank, batch, length) takes effect.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from fedlora.client.profiles import PROFILES
from fedlora.launch import parse_overrides

ONE_ROUND = r"""
import json, resource, sys, time
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from fedlora.core import keys
from fedlora.lora.adapters import to_record
from fedlora.client.setup import Client
from fedlora.client_app import app
from fedlora.config import RunConfig
from fedlora.strategies import strategy_info
from fedlora.strategies.base import initial_record

flat, profile, clients = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])
cfg = RunConfig.from_flat(flat)
node = {"partition-id": 0, "num-partitions": clients, **({"profile": profile} if profile else {})}
context = Context(run_id=1, node_id=1, state=RecordDict(), run_config=cfg.to_flat(), node_config=node)
TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
client = Client(context)  # loads the model and the client's data, as the first message would
loaded_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
arrays = to_record(initial_record(strategy_info(cfg.federation.strategy), client.loaded.initial_global))
times = {}
for kind in ("train", "evaluate"):
    content = RecordDict({keys.ARRAYS: arrays, keys.CONFIG: ConfigRecord({keys.C_SERVER_ROUND: 1})})
    start = time.perf_counter()
    reply = app(Message(content=content, dst_node_id=1, message_type=kind), context)
    times[kind] = time.perf_counter() - start
    assert not reply.has_error(), reply.error
print(json.dumps({
    "rank": client.rank, "batch_size": client.cfg.train.batch_size,
    "max_length": client.cfg.model.max_length, "threads": torch.get_num_threads(),
    "loaded_mb": loaded_mb, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "train_s": times["train"], "evaluate_s": times["evaluate"],
}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-config", default="strategy=flexlora max-length=128")
    parser.add_argument("--clients", type=int, default=20, help="partitions of the bundled corpus")
    args = parser.parse_args()
    flat = parse_overrides(args.run_config)
    print(f"one client process per profile, run config: {args.run_config or '(defaults)'}")
    header = (
        f"{'profile':<10}{'rank':>5}{'batch':>6}{'tokens':>7}{'threads':>8}"
        f"{'RSS loaded MB':>15}{'peak RSS MB':>13}{'train s':>9}{'eval s':>8}"
    )
    print(header)
    for profile in ("", *PROFILES):
        proc = subprocess.run(
            [sys.executable, "-c", ONE_ROUND, json.dumps(flat), profile, str(args.clients)],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise SystemExit(f"profile {profile or '(none)'} failed:\n{proc.stderr[-3000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(
            f"{profile or '(none)':<10}{r['rank']:>5}{r['batch_size']:>6}{r['max_length']:>7}"
            f"{r['threads']:>8}"
            f"{r['loaded_mb']:>15.0f}{r['peak_mb']:>13.0f}{r['train_s']:>9.1f}{r['evaluate_s']:>8.1f}"
        )


if __name__ == "__main__":
    main()
