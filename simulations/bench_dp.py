"""Benchmark: time per DP-SGD step divided by time per plain step, same model, data and batch.

Both loops run in this process, alternating in blocks so that a busy machine slows both
alike; the figure is the ratio of medians.

Usage: python simulations/bench_dp.py [--steps 20] [--blocks 5] [--run-config "model=minilm"]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from fedlora.config import RunConfig
from fedlora.data.federated import load_client_data, resolve_labels
from fedlora.launch import parse_overrides
from fedlora.lora.adapters import activate, load_adapter_state
from fedlora.models import GLOBAL, build_model
from fedlora.train import tokenize, train_steps
from fedlora.train.dpsgd import DPSettings, dp_train_steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20, help="steps per timed block")
    parser.add_argument("--blocks", type=int, default=5, help="timed blocks of each kind")
    parser.add_argument("--run-config", default="")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = RunConfig.from_flat(parse_overrides(args.run_config))
    labels = resolve_labels(cfg.data, cfg.model.task)
    loaded = build_model(cfg.model, len(labels), seed=0)
    data = load_client_data(cfg.data, cfg.model.task, 0, 20, 0)
    train = tokenize(loaded.tokenizer, data.train_texts, data.train_labels, cfg.model.max_length)
    batch = cfg.train.batch_size
    # Poisson sampling with q = batch / n: the same expected batch as the plain loop.
    dp = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=min(1.0, batch / len(train)))

    def block(private: bool) -> float:
        load_adapter_state(loaded.model, GLOBAL, loaded.initial_global)
        activate(loaded.model, [GLOBAL], trainable=[GLOBAL])
        lr = cfg.train.learning_rate
        if private:
            result = dp_train_steps(loaded.model, train, steps=args.steps, learning_rate=lr, seed=0, dp=dp)
        else:
            result = train_steps(
                loaded.model, train, steps=args.steps, batch_size=batch, learning_rate=lr, seed=0
            )
        return result.wall_s / args.steps

    block(False), block(True)  # warm-up
    plain, private = [], []
    for _ in range(args.blocks):
        plain.append(block(False))
        private.append(block(True))
    p, d = statistics.median(plain), statistics.median(private)
    print(f"model {cfg.model.model}, max-length {cfg.model.max_length}, {len(train)} examples, batch {batch}")
    print(f"plain step:   {1000 * p:.1f} ms (median of {args.blocks} blocks of {args.steps})")
    print(f"DP-SGD step:  {1000 * d:.1f} ms (Poisson q={dp.sample_rate:.3f}, clip 1.0, noise 1.0)")
    print(f"ratio DP / plain: {d / p:.2f}")


if __name__ == "__main__":
    main()
