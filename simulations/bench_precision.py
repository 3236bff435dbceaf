"""Benchmark: one client's peak memory, step time and held-out quality, float32 vs bfloat16 base.

Each variant runs in a fresh interpreter that does what a client process does: resolve
its configuration and load the model and its data through fedlora's client setup
(`fedlora.client.setup.Client`), then train the shared adapter and evaluate it on the
client's held-out split. Step time is measured after two warm-up steps (one-time costs
of the first batches); peak resident set size (``ru_maxrss``) is read after loading and
after training and evaluation. On the CPU the same client on a tiny random model of the
same family gives the fixed cost of a client process (libraries and their code pages), and
each variant's peak above it is printed too. Usage:

    python simulations/bench_precision.py [--steps 24] [--models smollm2,minilm]

``smollm2`` runs client 0 of the Shakespeare preset (causal LM, held-out perplexity);
``minilm`` client 0 of the default preset (bbc-news) (classification, held-out accuracy and loss).
Variants: ``base-dtype=float32`` (the default), ``base-dtype=bfloat16`` (compute in the
base's dtype, adapters float32), and ``bfloat16`` with ``precision=bf16`` autocast.

``--federation`` instead runs the whole Shakespeare preset once per variant on one
SuperLink, and prints each round's mean held-out perplexity (global and personalized)
and its ratio to float32's.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import fedlora
from fedlora.launch import flower_session
from fedlora.presets import PRESETS

ONE_CLIENT = r"""
import json, math, resource, sys, time
import torch
from flwr.app import Context, RecordDict
from fedlora.client.setup import Client
from fedlora.config import RunConfig
from fedlora.lora.adapters import activate
from fedlora.models import GLOBAL
from fedlora.train import train_steps
from fedlora.train.local import evaluate_adapter

flat, clients, steps = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(1)
cuda = flat.get("device", "cpu").startswith("cuda")
cfg = RunConfig.from_flat(flat)
node = {"partition-id": 0, "num-partitions": clients}
context = Context(run_id=1, node_id=1, state=RecordDict(), run_config=cfg.to_flat(), node_config=node)
client = Client(context)
loaded_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
model, train = client.loaded.model, client.train
activate(model, [GLOBAL], trainable=[GLOBAL])
kwargs = dict(batch_size=cfg.train.batch_size, learning_rate=cfg.train.learning_rate,
              precision=cfg.model.precision)
train_steps(model, train, steps=2, seed=0, **kwargs)  # warm-up
activate(model, [GLOBAL], trainable=[GLOBAL])
if cuda:
    torch.cuda.synchronize()
result = train_steps(model, train, steps=steps, seed=1, **kwargs)
if cuda:
    torch.cuda.synchronize()
from fedlora.lora.adapters import adapter_state
ev = evaluate_adapter(client.loaded, client.test, adapter_state(model, GLOBAL))
print(json.dumps({
    "loaded_mb": loaded_mb, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "step_s": result.wall_s / steps, "train_loss": result.loss, "test_loss": ev.loss,
    "test_accuracy": ev.accuracy, "test_examples": ev.num_examples,
    "gpu_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
}))
"""

VARIANTS = {
    "float32": {},
    "bfloat16 base": {"base-dtype": "bfloat16"},
    "bfloat16 base + bf16 autocast": {"base-dtype": "bfloat16", "precision": "bf16"},
}
# On a CUDA GPU also: a 4-bit NF4 base (QLoRA), computing in bfloat16.
CUDA_VARIANTS = {
    **VARIANTS,
    "4-bit NF4 base + bf16": {"quantization": "4bit", "base-dtype": "bfloat16", "precision": "bf16"},
}
WORKLOADS = {"smollm2": "shakespeare", "minilm": "bbc-news"}
# The same client on a tiny random model of the same family: what every client process
# costs whatever its model (torch, transformers, PEFT, Flower, their code pages).
FIXED_COST_MODELS = {"smollm2": "tiny-llama", "minilm": "tiny-bert"}


def measure(flat: dict, clients: int, steps: int) -> dict:
    """One variant in a fresh interpreter; its JSON line."""
    proc = subprocess.run(
        [sys.executable, "-c", ONE_CLIENT, json.dumps(flat), str(clients), str(steps)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(name: str, steps: int, device: str = "cpu") -> dict[str, dict]:
    """Measure every variant of one model on ``device``, print the table, return the rows."""
    preset = PRESETS[WORKLOADS[name]]
    flat = {**preset.config, "model": name, "device": device}
    variants = CUDA_VARIANTS if device.startswith("cuda") else VARIANTS
    rows = {label: measure({**flat, **extra}, preset.clients, steps) for label, extra in variants.items()}
    causal = flat.get("task") == "causal-lm"
    base = rows["float32"]
    print(f"\n{name} (client 0 of preset {WORKLOADS[name]!r}, {steps} steps, {device}, 1 thread)")
    quality = "test perplexity" if causal else "test accuracy"
    header = f"{'variant':32} {'loaded MB':>10} {'peak MB':>9} {'x':>5} {'step s':>8} {'x':>5}"
    print(f"{header} {quality:>16} {'x':>6}")
    for label, row in rows.items():
        value = math.exp(row["test_loss"]) if causal else row["test_accuracy"]
        reference = math.exp(base["test_loss"]) if causal else base["test_accuracy"]
        memory = f"{row['loaded_mb']:10.0f} {row['peak_mb']:9.0f} {row['peak_mb'] / base['peak_mb']:5.2f}"
        speed = f"{row['step_s']:8.3f} {row['step_s'] / base['step_s']:5.2f}"
        gpu = f"  GPU peak {row['gpu_peak_mb']:.0f} MB" if row.get("gpu_peak_mb") is not None else ""
        print(f"{label:32} {memory} {speed} {value:16.3f} {value / reference:6.3f}{gpu}")
    if not device.startswith("cuda"):
        fixed = measure({**flat, "model": FIXED_COST_MODELS[name]}, preset.clients, 2)["peak_mb"]
        print(f"fixed cost (the same client on {FIXED_COST_MODELS[name]}): peak {fixed:.0f} MB; above it:")
        for label, row in rows.items():
            grown = (row["peak_mb"] - fixed) / (base["peak_mb"] - fixed)
            print(f"  {label:30} {row['peak_mb'] - fixed:9.0f} MB  x{grown:.2f}")
    return rows


def federation(rounds: int) -> None:
    """The Shakespeare preset with each variant's base and precision: perplexity per round, and ratios."""
    runs = {}
    with tempfile.TemporaryDirectory() as tmp, flower_session() as session:
        for i, (label, extra) in enumerate(VARIANTS.items()):
            options = {key.replace("-", "_"): value for key, value in extra.items()}
            result = fedlora.run(
                preset="shakespeare", out=Path(tmp) / str(i), session=session, rounds=rounds, **options
            )
            runs[label] = result
            print(f"{label}: {result.final['wall_s']:.0f} s in the ServerApp", flush=True)
    print(f"\nShakespeare preset, {rounds} rounds: mean held-out perplexity over clients (x: of float32)")
    reference = runs["float32"]
    for label, result in runs.items():
        print(f"\n{label}")
        print(f"{'round':>5} {'global':>8} {'x':>6} {'personalized':>13} {'x':>6}")
        for a, b in zip(reference.rounds, result.rounds, strict=True):
            g, p = b["global_perplexity"], b["personalized_perplexity"]
            ratios = f"{g / a['global_perplexity']:6.3f} {p:13.1f} {p / a['personalized_perplexity']:6.3f}"
            print(f"{b['round']:>5} {g:8.1f} {ratios}")
        local, ref_local = result.final["local_only_perplexity"], reference.final["local_only_perplexity"]
        print(f"local-only: {local:.1f} (x{local / ref_local:.3f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=24, help="measured training steps per variant")
    parser.add_argument("--models", default="smollm2,minilm", help="comma-separated: smollm2, minilm")
    parser.add_argument("--device", default="cpu", help="cpu (default), or cuda: also a 4-bit base")
    parser.add_argument("--federation", action="store_true", help="the Shakespeare preset in each variant")
    parser.add_argument("--rounds", type=int, default=3, help="--federation: rounds (the preset's 3)")
    args = parser.parse_args()
    if args.federation:
        federation(args.rounds)
        return
    for name in args.models.split(","):
        table(name, args.steps, args.device)


if __name__ == "__main__":
    main()
